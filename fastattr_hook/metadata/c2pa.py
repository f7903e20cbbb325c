"""C2PA carrier: a signed manifest, the one carrier nobody can edit without the signer's key."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..attribution import Attribution
from ..errors import FastattrError
from .common import _MIME, DIGITAL_SOURCE_TYPE, _parse_record

C2PA_LABEL = "dev.fastattr.attribution"
_C2PA_ALGS = ("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519")
_OFFLINE = {"verify": {"remote_manifest_fetch": False}}  # never fetch a manifest a file only points to
_PARENT_ID = "parent"  # links the c2pa.opened action to the parentOf ingredient
_ANCHORS_FIX = "give a PEM file of the root certificates whose signers you trust"


@dataclass(frozen=True)
class C2paConfig:
    """Signing credentials for C2PA; fastattr never creates or stores keys itself."""

    cert_chain: str | Path   # PEM: end-entity certificate first, then intermediates
    private_key: str | Path  # PEM private key of the end-entity certificate
    alg: str = "es256"
    ta_url: str | None = None  # RFC 3161 timestamp authority; None keeps signing offline


def _c2pa_module():
    try:
        import c2pa
    except ImportError:
        raise FastattrError("C2PA manifests need c2pa-python: pip install 'fastattr[c2pa]'") from None
    return c2pa


def _c2pa_available() -> bool:
    try:
        _c2pa_module()
    except FastattrError:
        return False
    return True


def _read_pem(file: str | Path, what: str, fix: str = "point C2paConfig at a PEM file") -> bytes:
    try:
        data = Path(file).read_bytes()
    except OSError as exc:
        raise FastattrError(f"C2PA {what} {file} cannot be read ({exc.strerror}); {fix}") from None
    if b"-----BEGIN " not in data:
        raise FastattrError(f"C2PA {what} {file} is not PEM; convert it (openssl ... -outform PEM)")
    return data


def _sign_c2pa(data: bytes, fmt: str, attribution: Attribution, config: C2paConfig, path: Path,
               previous: bytes | None = None) -> bytes:
    """Embed a signed manifest: a ``c2pa.created`` action (trainedAlgorithmicMedia) + our assertion.

    The assertion holds the document (what C2PA viewers show) and its JSON text under ``json``, the
    copy that is read back: c2pa re-parses the manifest with a JSON parser that moves about one
    full-precision float in ten by one ulp (0.012345678901234567 -> ...68) and turns arrays of
    numbers into bytes, so only the text round-trips exactly.

    ``previous`` is the file as it was before this write. When it carries a manifest (a camera's,
    another tool's, our last one), that manifest becomes the ``parentOf`` ingredient of ours, so the
    provenance chain survives; C2PA allows ``c2pa.created`` only without a parent, so the actions are
    then ``c2pa.opened`` (the parent) and ``c2pa.edited.metadata`` (the pixels are untouched).
    """
    c2pa = _c2pa_module()
    if config.alg.lower() not in _C2PA_ALGS:
        raise FastattrError(f"C2PA signing algorithm {config.alg!r} is not one of {', '.join(_C2PA_ALGS)}")
    chain = _read_pem(config.cert_chain, "certificate chain")
    key = _read_pem(config.private_key, "private key")
    mime = _MIME[fmt]
    agent = {"name": "fastattr", "version": __version__}
    with c2pa.Context.from_dict(_OFFLINE) as context:
        chained = previous is not None and _has_manifest(c2pa, context, previous, mime, path)
        if chained:
            actions = [{"action": "c2pa.opened", "softwareAgent": agent,
                        "parameters": {"ingredientIds": [_PARENT_ID]}},
                       {"action": "c2pa.edited.metadata", "softwareAgent": agent}]
        else:
            actions = [{"action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE,
                        "softwareAgent": agent}]
        manifest = {
            "claim_generator_info": [agent],
            "title": path.name,
            "format": mime,
            "assertions": [
                {"label": "c2pa.actions", "data": {"actions": actions}},
                {"label": C2PA_LABEL, "data": {**attribution.to_dict(), "json": attribution.to_json()}},
            ],
        }
        signed = io.BytesIO()
        try:
            info = c2pa.C2paSignerInfo(alg=config.alg.lower(), sign_cert=chain, private_key=key,
                                       ta_url=config.ta_url)
            with c2pa.Signer.from_info(info) as signer, c2pa.Builder(manifest, context=context) as builder:
                if chained:
                    builder.add_ingredient({"title": path.name, "relationship": "parentOf", "label": _PARENT_ID},
                                           mime, io.BytesIO(previous))
                builder.sign(signer, mime, io.BytesIO(data), signed)
        except (c2pa.C2paError, ValueError) as exc:
            raise FastattrError(f"C2PA signing of {path} failed ({exc}); check that {config.private_key} "
                                f"matches the first certificate in {config.cert_chain} and alg "
                                f"{config.alg!r} fits the key") from None
    return signed.getvalue()


def _has_manifest(c2pa, context, data: bytes, mime: str, path: Path) -> bool:
    """Whether ``data`` carries a manifest to chain; one that cannot be parsed cannot be chained,
    and dropping it silently would lose provenance, so that is an error."""
    try:
        reader = c2pa.Reader.try_create(mime, io.BytesIO(data), context=context)
    except c2pa.C2paError as exc:
        raise FastattrError(f"the C2PA manifest already in {path} cannot be read ({exc}), so it cannot be "
                            "chained as the parent of the new one; to drop it, write once without a "
                            "C2paConfig, then sign") from None
    if reader is None:
        return False
    reader.close()
    return True


def _read_c2pa(data: bytes, fmt: str, trust_anchors: str | Path | None) -> dict | None:
    """Our (active) manifest in ``data`` (a file's bytes, in format ``fmt``); ``parent`` names the
    manifest it was chained to, and the digital source type is that of the ``c2pa.created`` action
    the chain starts from. ``signer`` is who signed it, and ``trust`` whether that certificate chains
    to ``trust_anchors`` (a PEM file of root certificates): a valid signature alone only proves that
    someone holding some key signed, and anyone can make a certificate naming anyone."""
    c2pa = _c2pa_module()
    with _reading_context(c2pa, trust_anchors) as context:
        try:
            reader = c2pa.Reader.try_create(_MIME[fmt], io.BytesIO(data), context=context)
            if reader is None:
                return None
            with reader:
                store = json.loads(reader.json())
                state = reader.get_validation_state()
        except c2pa.C2paError as exc:
            return {"value": None, "error": f"manifest unreadable: {exc}"}
    manifests = store.get("manifests", {})
    lineage = _lineage(manifests, store.get("active_manifest"))
    manifest = lineage[0] if lineage else {}
    parent = _parent_ingredient(manifest)
    record = {"validation_state": state, "signer": _signer(manifest.get("signature_info") or {}),
              "trust": _trust(state, trust_anchors),
              "digital_source_type": next((a.get("digitalSourceType") for m in lineage for a in _actions(m)
                                           if a.get("action") == "c2pa.created"), None),
              "parent": None if parent is None else _describe_parent(parent, manifests)}
    ours = next((a for a in manifest.get("assertions", []) if a.get("label") == C2PA_LABEL), None)
    if ours is None:
        return {**record, "value": None, "note": f"manifest has no {C2PA_LABEL} assertion"}
    return {**record, **_parse_record(lambda: _assertion_attribution(ours.get("data")))}


def _reading_context(c2pa, trust_anchors: str | Path | None):
    """Offline; with ``trust_anchors`` the only roots a signer may chain to (they replace c2pa's own)."""
    if trust_anchors is None:
        return c2pa.Context.from_dict(_OFFLINE)
    try:
        return c2pa.Context.from_dict({"verify": {**_OFFLINE["verify"], "verify_trust": True},
                                       "trust": {"trust_anchors": _anchors_pem(trust_anchors)}})
    except c2pa.C2paError as exc:
        raise FastattrError(f"C2PA trust anchors {trust_anchors} cannot be used ({exc}); {_ANCHORS_FIX}") from None


def _anchors_pem(trust_anchors: str | Path) -> str:
    """The PEM text, once every certificate in it parses: c2pa skips a block it cannot parse (a key, a
    damaged certificate) and would then trust no signer, without saying why."""
    try:
        from cryptography import x509
    except ImportError:
        raise FastattrError("checking C2PA trust anchors needs cryptography: pip install 'fastattr[c2pa]'") from None
    pem = _read_pem(trust_anchors, "trust anchors", _ANCHORS_FIX)
    try:
        x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise FastattrError(f"C2PA trust anchors {trust_anchors} cannot be used ({exc}); {_ANCHORS_FIX}") from None
    return pem.decode("latin-1")  # PEM is ASCII; comments around it may be anything


def _signer(signature_info: dict) -> str | None:
    """The signing certificate's subject as c2pa gives it: its common name, and its organization
    (which c2pa calls ``issuer``)."""
    parts = [f"{field}={signature_info[key]}" for key, field in (("common_name", "CN"), ("issuer", "O"))
             if signature_info.get(key)]
    return ", ".join(parts) or None


def _trust(state: str | None, trust_anchors: str | Path | None) -> str | None:
    """``trusted``: the signature validates and its certificate chains to one of the trust anchors;
    ``untrusted``: it validates, but chains to none; ``unchecked``: no trust anchors were given."""
    if state not in ("Valid", "Trusted"):
        return None
    if trust_anchors is None:
        return "unchecked"
    return "trusted" if state == "Trusted" else "untrusted"


def _lineage(manifests: dict, label: str | None) -> list[dict]:
    """The active manifest, its parent's, and so on (a label seen twice ends the walk)."""
    labels = []
    while label in manifests and label not in labels:
        labels.append(label)
        parent = _parent_ingredient(manifests[label])
        label = None if parent is None else parent.get("active_manifest")
    return [manifests[label] for label in labels]


def _parent_ingredient(manifest: dict) -> dict | None:
    return next((i for i in manifest.get("ingredients", []) if i.get("relationship") == "parentOf"), None)


def _actions(manifest: dict) -> list[dict]:
    return [action for a in manifest.get("assertions", []) if a.get("label", "").startswith("c2pa.actions")
            for action in a.get("data", {}).get("actions", [])]


def _describe_parent(ingredient: dict, manifests: dict) -> str:
    """Title and claim generator of the parent, e.g. ``photo.jpg (fastattr 0.4.0)``."""
    title = ingredient.get("title") or "untitled"
    manifest = manifests.get(ingredient.get("active_manifest"))
    if manifest is None:
        return title
    info = (manifest.get("claim_generator_info") or [{}])[0]
    generator = " ".join(str(info[key]) for key in ("name", "version") if info.get(key))
    generator = generator or manifest.get("claim_generator")
    return f"{title} ({generator})" if generator else title


def _assertion_attribution(data: object) -> Attribution:
    """The exact ``json`` copy when present (manifests before it carry only the structured data)."""
    exact = data.get("json") if isinstance(data, dict) else None
    return Attribution.from_json(exact) if isinstance(exact, str) else Attribution.from_dict(data)
