"""Write an image's credits where image tools and provenance standards look, and read them back.

Carriers (``CARRIERS``):

- ``png``: iTXt chunk ``fastattr`` with the attribution JSON (truncated to ``max_json_bytes``).
- ``xmp``: an XMP packet with IPTC ``Iptc4xmpExt:DigitalSourceType`` = trainedAlgorithmicMedia and a
  short summary of the top credits in the ``fastattr`` namespace (PNG iTXt, JPEG APP1, WebP chunk).
- ``exif``: EXIF UserComment (JPEG/WebP) with the attribution JSON, ASCII or UNICODE charset.
- ``sidecar``: ``NAME.attribution.json`` next to the image, full and untruncated; the one carrier
  that survives re-encoding.
- ``c2pa``: a signed C2PA manifest (optional, needs ``fastattr[c2pa]``).

Metadata is spliced into the encoded file at the container level (PNG chunks, JPEG segments, WebP
RIFF chunks), so writing in place never re-encodes pixels and keeps every unrelated chunk/segment.
A previous C2PA manifest no longer matches the changed file (its hash binding): with a ``C2paConfig``
it becomes the ``parentOf`` ingredient of the new signed manifest; without one it is dropped. An XMP
packet the image already has is merged into, never replaced: one that cannot be parsed is refused.

``inspect_image`` names who signed a C2PA manifest; the credits are authenticated only when its
certificate chains to the ``trust_anchors`` given (anyone can sign a valid manifest with a
certificate they made). Reading is bounded: image files of at most 256 MiB and 10,000 PNG/WebP
chunks (one per 4 KiB in larger files), sidecars of at most 16 MiB, 64 MiB of inflated PNG text in
all; beyond that, a file is refused (a sidecar reported) by name and limit.

One module per carrier or container (``png``, ``jpeg``, ``webp``, ``exif``, ``xmp``, ``sidecar``,
``c2pa``); ``writing`` and ``reading`` go through all of them; ``common`` holds what several share.
"""

# ``NAME as NAME``: public names outside ``__all__``, importable from here as before the split
from .c2pa import C2PA_LABEL as C2PA_LABEL, C2paConfig
from .common import DIGITAL_SOURCE_TYPE as DIGITAL_SOURCE_TYPE
from .png import PNG_KEY as PNG_KEY, XMP_KEY as XMP_KEY
from .reading import CARRIERS, CREDIT_FIELDS as CREDIT_FIELDS, format_inspection, inspect_image, read_attribution
from .reading import printable as printable
from .sidecar import SIDECAR_SUFFIX as SIDECAR_SUFFIX, sidecar_path
from .writing import save_with_attribution, write_attribution_in_place
from .xmp import FASTATTR_NS as FASTATTR_NS, IPTC_EXT_NS as IPTC_EXT_NS, RDF_NS as RDF_NS, XMP_TOP as XMP_TOP

__all__ = ["CARRIERS", "C2paConfig", "format_inspection", "inspect_image", "read_attribution",
           "save_with_attribution", "sidecar_path", "write_attribution_in_place"]
