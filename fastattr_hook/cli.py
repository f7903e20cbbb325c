"""``fastattr attribute`` and ``fastattr inspect``: the runtime's own commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import FastattrError

if TYPE_CHECKING:
    from PIL import Image

    from .attribution import Attribution
    from .inputs import InputRejected


def _attribute(args) -> int:
    from .inputs import InputRejected, check_text

    check_text(args.prompt, "--prompt", "the prompt")  # the manifest's rule for captions, before a tokenizer sees it
    images = _read_images(args.images)
    good = [image for image in images if not isinstance(image, InputRejected)]
    found = iter(_attributor(args.bundle, args.device).attribute(good, args.prompt, k=args.k) if good else ())
    results = [image if isinstance(image, InputRejected) else next(found) for image in images]
    unwritten = 0
    if args.write_metadata:
        unwritten = _write_metadata(args, [(path, r) for path, r in zip(args.images, results)
                                           if not isinstance(r, InputRejected)])
    _print_results(args, results)
    return 2 if len(good) < len(images) or unwritten else 0


def _print_results(args, results: list[Attribution | InputRejected]) -> None:
    from .inputs import InputRejected

    if args.json:  # one entry per image, in argument order: a bad image's entry says why
        print(json.dumps([{"path": path, "error": str(r)} if isinstance(r, InputRejected) else r.to_dict()
                          for path, r in zip(args.images, results)], indent=1, ensure_ascii=False))
        return
    from .metadata import printable  # captions and creators come from scraped data: controls are shown escaped

    for path, result in zip(args.images, results):
        if isinstance(result, InputRejected):
            continue  # reported on stderr as it was read
        print(f"{path}  (prompt: {result.prompt!r}, {result.timing_ms['total']:.1f} ms)")
        for c in result.credits:
            print(f"  {c.rank:>3}. {printable(c.id):<24} score {c.score:+.4f}  share {c.share:6.1%}  "
                  f"{printable(c.creator or '-')} [{printable(c.license or '-')}]  {printable(c.caption[:60])}")


def _read_images(paths: list[str]) -> list[Image.Image | InputRejected]:
    """Each image under the limits a manifest's images have (``fastattr_hook.inputs``: no FIFO, no
    decompression bomb, no 3,000,000 x 1 strip); a bad one is reported here and the others still run."""
    from .inputs import InputRejected, open_image

    images = []
    for path in paths:
        try:
            images.append(open_image(path))
        except InputRejected as exc:
            print(f"error: {exc}", file=sys.stderr)
            images.append(exc)
    return images


def _attributor(bundle: str | None, device: str | None):
    from .attributor import Attributor

    if bundle is None:
        from .bundle import shipped_bundle

        bundle = shipped_bundle()
        if bundle is None:
            raise FastattrError("no --bundle given and no shipped sandbox bundle (fastattr_sandbox is not "
                                "installed); pass --bundle BUNDLE")
        print(f"no --bundle given: using the shipped sandbox bundle {bundle}", file=sys.stderr)
    print("loading the bundle and its encoder ...", file=sys.stderr)
    return Attributor.from_bundle(bundle, device=device)


def _write_metadata(args, results: list[tuple[str, Attribution]]) -> int:
    """Embed each good image's credits, in place or in copies under ``--out``; returns how many could
    not be written. One that cannot (a DTD in its XMP, a read-only file) is reported and the batch goes
    on; under ``--out`` its copy is removed, so every file there carries credits."""
    import shutil

    from .metadata import C2paConfig, printable, write_attribution_in_place

    if bool(args.c2pa_cert) != bool(args.c2pa_key):
        raise FastattrError("C2PA signing needs both --c2pa-cert and --c2pa-key")
    c2pa = C2paConfig(args.c2pa_cert, args.c2pa_key) if args.c2pa_cert else None
    unwritten = 0
    for path, result in results:
        target, copied = Path(path), False
        try:
            if args.out:  # copy first: writing metadata never re-encodes pixels
                Path(args.out).mkdir(parents=True, exist_ok=True)
                target, copied = Path(shutil.copy2(path, Path(args.out) / target.name)), True
            write_attribution_in_place(target, result, c2pa=c2pa)
        except (FastattrError, OSError) as exc:  # OSError: also shutil.SameFileError (--out is the image's folder)
            unwritten += 1
            if copied:  # only a copy this made; never the image itself
                target.unlink(missing_ok=True)
            print(printable(f"error: credits not written: {_naming(path, exc)}"), file=sys.stderr)
            continue
        print(f"wrote credits into {target}", file=sys.stderr)
    return unwritten


def _naming(path: str, exc: Exception) -> str:
    """The error's message, naming ``path`` once (most of ours already start with it)."""
    return str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}"


def _inspect(args) -> int:
    from .metadata import printable, format_inspection, inspect_image

    reports = []
    for path in args.images:  # one bad file is reported; the others still are inspected
        try:
            reports.append(inspect_image(path, trust_anchors=args.trust_anchors))
        except FastattrError as exc:
            reports.append({"path": str(path), "error": _naming(path, exc), "agree": False})
    print(json.dumps(reports, indent=1, ensure_ascii=False) if args.json
          else "\n\n".join(printable(r["error"]) if "error" in r else format_inspection(r) for r in reports))
    return 0 if all(r.get("agree", True) for r in reports) else 1


def register(commands) -> None:
    p = commands.add_parser("attribute", help="which training images made these images?")
    p.add_argument("images", nargs="+", help="generated images (PNG, JPEG, WebP), under a training manifest's limits "
                   "(64 MiB, 64 Mpixels, aspect ratio 32:1, regular files); a bad one is reported, the others are "
                   "still attributed, and the exit code is 2")
    p.add_argument("--prompt", required=True, help="the prompt they were generated from (UTF-8, at most 100,000 "
                   "characters)")
    p.add_argument("--bundle", help="index bundle (default: the shipped sandbox bundle)")
    p.add_argument("--k", type=int, default=10, help="credits per image (default 10)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one fastattr/attribution@1 object per "
                   "image (a list also for one image; a bad image's entry is {path, error})")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--write-metadata", action="store_true", help="embed the credits in each image (atomic); "
                   "one that cannot take them is reported, the others still get theirs, and the exit code is 2")
    p.add_argument("--out", help="with --write-metadata: write copies here instead of in place")
    p.add_argument("--c2pa-cert", help="with --write-metadata: PEM certificate chain to sign a C2PA manifest")
    p.add_argument("--c2pa-key", help="with --write-metadata: PEM private key of that certificate")
    p.set_defaults(func=_attribute)

    p = commands.add_parser("inspect", help="show the credit metadata carried by images")
    p.add_argument("images", nargs="+", help="images (PNG, JPEG, WebP); a sidecar beside an image is read too, and one "
                   "bad file is reported while the others still are inspected")
    p.add_argument("--json", action="store_true", help="a JSON list, one report per image, instead of text")
    p.add_argument("--trust-anchors", metavar="PEM", help="root certificates you trust: the credits are authenticated "
                   "only when a valid C2PA manifest's signer chains to one of them (without: never, as anyone can "
                   "sign with a certificate they made)")
    p.set_defaults(func=_inspect)
