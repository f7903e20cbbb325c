"""``fastattr attribute`` and ``fastattr inspect``: the runtime's own commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import FastattrError


def _attribute(args) -> int:
    from PIL import Image

    from .attributor import Attributor

    bundle = args.bundle
    if bundle is None:
        from .bundle import shipped_bundle

        bundle = shipped_bundle()
        if bundle is None:
            raise FastattrError("no --bundle given and no shipped sandbox bundle (fastattr_sandbox is not "
                                "installed); pass --bundle BUNDLE")
        print(f"no --bundle given: using the shipped sandbox bundle {bundle}", file=sys.stderr)
    print("loading the bundle and its encoder ...", file=sys.stderr)
    attributor = Attributor.from_bundle(bundle, device=args.device)
    images = []
    for path in args.images:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise FastattrError(f"{path}: cannot read image ({exc})") from None
    results = attributor.attribute(images, args.prompt, k=args.k)
    if args.write_metadata:
        import shutil

        from .metadata import C2paConfig, write_attribution_in_place

        if bool(args.c2pa_cert) != bool(args.c2pa_key):
            raise FastattrError("C2PA signing needs both --c2pa-cert and --c2pa-key")
        c2pa = C2paConfig(args.c2pa_cert, args.c2pa_key) if args.c2pa_cert else None
        for path, result in zip(args.images, results):
            target = Path(path)
            if args.out:  # copy first: writing metadata never re-encodes pixels
                Path(args.out).mkdir(parents=True, exist_ok=True)
                target = Path(shutil.copy2(path, Path(args.out) / target.name))
            write_attribution_in_place(target, result, c2pa=c2pa)
            print(f"wrote credits into {target}", file=sys.stderr)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=1, ensure_ascii=False))
    else:  # captions and creators come from scraped data: control characters are shown escaped
        from .metadata import printable

        for path, result in zip(args.images, results):
            print(f"{path}  (prompt: {result.prompt!r}, {result.timing_ms['total']:.1f} ms)")
            for c in result.credits:
                print(f"  {c.rank:>3}. {printable(c.id):<24} score {c.score:+.4f}  share {c.share:6.1%}  "
                      f"{printable(c.creator or '-')} [{printable(c.license or '-')}]  {printable(c.caption[:60])}")
    return 0


def _inspect(args) -> int:
    from .metadata import printable, format_inspection, inspect_image

    reports = []
    for path in args.images:  # one bad file is reported; the others still are inspected
        try:
            reports.append(inspect_image(path))
        except FastattrError as exc:
            reports.append({"path": str(path), "error": str(exc), "agree": False})
    print(json.dumps(reports, indent=1, ensure_ascii=False) if args.json
          else "\n\n".join(f"{printable(r['path'])}: {printable(r['error'])}" if "error" in r
                             else format_inspection(r) for r in reports))
    return 0 if all(r.get("agree", True) for r in reports) else 1


def register(commands) -> None:
    p = commands.add_parser("attribute", help="which training images made these images?")
    p.add_argument("images", nargs="+", help="generated images (PNG, JPEG, WebP)")
    p.add_argument("--prompt", required=True, help="the prompt they were generated from")
    p.add_argument("--bundle", help="index bundle (default: the shipped sandbox bundle)")
    p.add_argument("--k", type=int, default=10, help="credits per image (default 10)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one fastattr/attribution@1 object per "
                   "image (a list also for one image)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--write-metadata", action="store_true", help="embed the credits in each image (atomic)")
    p.add_argument("--out", help="with --write-metadata: write copies here instead of in place")
    p.add_argument("--c2pa-cert", help="with --write-metadata: PEM certificate chain to sign a C2PA manifest")
    p.add_argument("--c2pa-key", help="with --write-metadata: PEM private key of that certificate")
    p.set_defaults(func=_attribute)

    p = commands.add_parser("inspect", help="show the credit metadata carried by images")
    p.add_argument("images", nargs="+", help="images (PNG, JPEG, WebP); a sidecar beside an image is read too, and one "
                   "bad file is reported while the others still are inspected")
    p.add_argument("--json", action="store_true", help="a JSON list, one report per image, instead of text")
    p.set_defaults(func=_inspect)
