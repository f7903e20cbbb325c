"""C2PA carrier: a signed manifest, the one carrier nobody can edit without the signer's key."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..attribution import Attribution
from ..errors import FastattrError
from .common import _MIME, DIGITAL_SOURCE_TYPE, _parse_record

C2PA_LABEL = "dev.fastattr.attribution"
_C2PA_ALGS = ("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519")


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


def _read_pem(file: str | Path, what: str) -> bytes:
    try:
        data = Path(file).read_bytes()
    except OSError as exc:
        raise FastattrError(f"C2PA {what} {file} cannot be read ({exc.strerror}); "
                            "point C2paConfig at a PEM file") from None
    if b"-----BEGIN " not in data:
        raise FastattrError(f"C2PA {what} {file} is not PEM; convert it (openssl ... -outform PEM)")
    return data


def _sign_c2pa(data: bytes, fmt: str, attribution: Attribution, config: C2paConfig, path: Path) -> bytes:
    """Embed a signed manifest: ``c2pa.created`` (trainedAlgorithmicMedia) + our assertion.

    The assertion holds the document (what C2PA viewers show) and its JSON text under ``json``, the
    copy that is read back: c2pa re-parses the manifest with a JSON parser that moves about one
    full-precision float in ten by one ulp (0.012345678901234567 -> ...68) and turns arrays of
    numbers into bytes, so only the text round-trips exactly.
    """
    c2pa = _c2pa_module()
    if config.alg.lower() not in _C2PA_ALGS:
        raise FastattrError(f"C2PA signing algorithm {config.alg!r} is not one of {', '.join(_C2PA_ALGS)}")
    chain = _read_pem(config.cert_chain, "certificate chain")
    key = _read_pem(config.private_key, "private key")
    manifest = {
        "claim_generator_info": [{"name": "fastattr", "version": __version__}],
        "title": path.name,
        "format": _MIME[fmt],
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": [
                {"action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE,
                 "softwareAgent": {"name": "fastattr", "version": __version__}}]}},
            {"label": C2PA_LABEL, "data": {**attribution.to_dict(), "json": attribution.to_json()}},
        ],
    }
    signed = io.BytesIO()
    try:
        info = c2pa.C2paSignerInfo(alg=config.alg.lower(), sign_cert=chain, private_key=key,
                                   ta_url=config.ta_url)
        with c2pa.Signer.from_info(info) as signer, c2pa.Builder(manifest) as builder:
            builder.sign(signer, _MIME[fmt], io.BytesIO(data), signed)
    except (c2pa.C2paError, ValueError) as exc:
        raise FastattrError(f"C2PA signing of {path} failed ({exc}); check that {config.private_key} "
                            f"matches the first certificate in {config.cert_chain} and alg "
                            f"{config.alg!r} fits the key") from None
    return signed.getvalue()


def _read_c2pa(path: Path) -> dict | None:
    c2pa = _c2pa_module()
    try:  # offline: never fetch a manifest that the file only points to by URL
        with c2pa.Context.from_dict({"verify": {"remote_manifest_fetch": False}}) as context:
            reader = c2pa.Reader.try_create(str(path), context=context)
            if reader is None:
                return None
            with reader:
                manifest = reader.get_active_manifest() or {}
                state = reader.get_validation_state()
    except c2pa.C2paError as exc:
        return {"value": None, "error": f"manifest unreadable: {exc}"}
    assertions = manifest.get("assertions", [])
    actions = [action for a in assertions if a.get("label", "").startswith("c2pa.actions")
               for action in a.get("data", {}).get("actions", [])]
    record = {"validation_state": state,
              "digital_source_type": next((a.get("digitalSourceType") for a in actions
                                           if a.get("action") == "c2pa.created"), None)}
    ours = next((a for a in assertions if a.get("label") == C2PA_LABEL), None)
    if ours is None:
        return {**record, "value": None, "note": f"manifest has no {C2PA_LABEL} assertion"}
    return {**record, **_parse_record(lambda: _assertion_attribution(ours.get("data")))}


def _assertion_attribution(data: object) -> Attribution:
    """The exact ``json`` copy when present (manifests before it carry only the structured data)."""
    exact = data.get("json") if isinstance(data, dict) else None
    return Attribution.from_json(exact) if isinstance(exact, str) else Attribution.from_dict(data)
