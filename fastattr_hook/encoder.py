"""The attribution encoder f = g(phi(.)): frozen backbones, concatenated, then the tuned MLP head.

Built from a YAML spec (see README "Encoder spec"). The same ``f`` embeds queries (generated
image + prompt) and training items (image + caption); cosine similarity ranks influence.

Orientation: the published head is trained so that a LOW calibrated score means MORE influence.
Whatever the sign of the learned scale, ``embed(..., role="query")`` flips the query vector when
needed so that a higher inner product always means more influential.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .files import sha256_file
from .config import load_yaml, to_dict
from .errors import FastattrError
from .head import AttributionHead, load_head
from .inputs import check_image_size

BackboneKind = Literal["open_clip_image", "open_clip_text", "timm_image"]
BackboneOutput = Literal["embedding", "tokens"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class BackboneSpec:
    """One frozen feature extractor. Paths are relative to the spec file."""

    kind: BackboneKind
    model: str  # open_clip name ("ViT-B-32"), "local-dir:PATH" (open_clip folder), or a timm name
    weights: str | None = None  # local weights file (safetensors / .pt / .bin); None = none or in local-dir
    tokenizer: str | None = None  # open_clip_text: a Hugging Face tokenizer folder; default open_clip's
    resize: int = 256  # timm_image preprocessing (method.md: DINO resize 256 bicubic, crop 224)
    crop: int = 224
    # "embedding" is CLIP's embedding; "tokens" is what the tower holds before its projection narrows it to
    # what image and caption share (2 x width): the image tower's class token and mean patch token, the text
    # tower's end token and mean token over the prompt
    output: BackboneOutput = "embedding"


@dataclass
class EncoderSpec:
    name: str
    backbones: list[BackboneSpec]
    head: str | None = None  # None = the untuned baseline (normalised concatenated features)
    batch_size: int = 64


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".json", ".ckpt")


@dataclass(frozen=True)
class Reference:
    """A ``model``/``weights``/``tokenizer``/``head`` value of a spec, resolved by the one rule
    every reader uses: ``local-dir:FOLDER``; ``hf-hub:org/name`` (read from the local Hugging Face
    cache); a local path (has a folder separator or a weights suffix, or exists beside the spec),
    resolved against the spec's folder; anything else is a name: an open_clip model or pretrained
    tag such as ``openai``, or a timm model."""

    kind: Literal["dir", "hub", "path", "name"]
    value: str  # absolute for "dir" and "path", as written otherwise

    @property
    def local(self) -> bool:
        return self.kind in ("dir", "path")

    def __str__(self) -> str:
        return f"local-dir:{self.value}" if self.kind == "dir" else self.value

    def files(self) -> list[Path]:
        """The local files behind the reference (what the fingerprint hashes)."""
        path = Path(self.value)
        if path.is_dir():
            return sorted(p for p in path.rglob("*") if p.is_file())
        if not path.is_file():
            raise FastattrError(f"encoder file not found: {path}; fix the path in the encoder spec")
        return [path]


def resolve_reference(base: Path, value: str | None) -> Reference | None:
    if value is None:
        return None
    if value.startswith("local-dir:"):
        return Reference("dir", str((base / Path(value.removeprefix("local-dir:")).expanduser()).resolve()))
    if value.startswith("hf-hub:"):
        return Reference("hub", value)
    path = Path(value).expanduser()
    if "/" in value or "\\" in value or value.startswith(("~", ".")) or value.endswith(WEIGHT_SUFFIXES) \
            or (base / path).exists():
        return Reference("path", str(path if path.is_absolute() else (base / path).resolve()))
    return Reference("name", value)


def relocated_spec(spec: EncoderSpec, spec_dir: Path, new_dir: Path) -> dict:
    """``spec`` as a dict for a YAML file in ``new_dir``: local references rewritten relative to it
    (so trees can move), names and hub ids kept."""
    import os

    def moved(value: str | None) -> str | None:
        ref = resolve_reference(spec_dir, value)
        if ref is None or not ref.local:
            return value
        rel = os.path.relpath(ref.value, new_dir.resolve())
        return f"local-dir:{rel}" if ref.kind == "dir" else rel

    data = to_dict(spec)
    for b in data["backbones"]:
        for key in ("model", "weights", "tokenizer"):
            b[key] = moved(b[key])
    data["head"] = moved(data["head"])
    return data


class Encoder:
    """Embeds (image, text) pairs into L2-normalised vectors of width ``dim``."""

    def __init__(self, spec: EncoderSpec, base_dir: str | Path = ".", device: str | torch.device | None = None):
        self.spec = spec
        self.base_dir = Path(base_dir).resolve()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._models: dict[tuple, tuple] = {}
        self.backbones = [self._build_backbone(b) for b in spec.backbones]
        self.feature_dim = sum(b.dim for b in self.backbones)
        self.head: AttributionHead | None = None
        if spec.head:
            self.head = load_head(self.reference(spec.head).value).to(self.device).eval()
            if self.head.in_features != self.feature_dim:
                raise FastattrError(
                    f"head {spec.head} expects {self.head.in_features}-d input but the backbones give "
                    f"{self.feature_dim}-d ({' + '.join(f'{b.spec.kind}:{b.dim}' for b in self.backbones)}); "
                    "use the backbones the head was trained with")
        self.dim = self.head.out_features if self.head else self.feature_dim
        self._fingerprint: str | None = None

    @classmethod
    def from_yaml(cls, path: str | Path, device: str | torch.device | None = None) -> "Encoder":
        path = Path(path)
        return cls(load_yaml(EncoderSpec, path), path.parent, device)

    def reference(self, value: str | None) -> Reference | None:
        return resolve_reference(self.base_dir, value)

    # -- backbones ---------------------------------------------------------------------------
    def _build_backbone(self, spec: BackboneSpec) -> "_Backbone":
        if spec.output != "embedding" and spec.kind == "timm_image":
            raise FastattrError(f"encoder spec of '{self.spec.name}': backbone {spec.kind} has no output "
                                f"'{spec.output}'; only open_clip backbones take output: tokens")
        if spec.kind in ("open_clip_image", "open_clip_text"):
            return _OpenClipBackbone(spec, self)
        return _TimmBackbone(spec, self)

    def _open_clip(self, model: str, weights: str | None):
        """One loaded open_clip model per (model, weights): image and text towers share it."""
        import open_clip

        key = ("open_clip", model, weights)
        if key not in self._models:
            try:
                clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=weights)
            except (RuntimeError, OSError, ValueError) as exc:
                hint = ""
                if weights and not Path(weights).is_file() or model.startswith("hf-hub:"):
                    hint = (" (a pretrained tag or hf-hub id is read from the local Hugging Face cache: fetch it "
                            "once where a network is available, or point 'weights' at a local file)")
                raise FastattrError(f"cannot load open_clip model '{model}' (weights: {weights}): {exc}{hint}") from None
            self._models[key] = (clip.to(self.device).eval(), preprocess)
        return self._models[key]

    # -- embedding ---------------------------------------------------------------------------
    @property
    def orientation(self) -> float:
        """+1 or -1: the sign that makes a higher query-item inner product mean more influence."""
        return -1.0 if self.head is not None and self.head.scale.item() > 0 else 1.0

    def preprocess(self, image: Image.Image, text: str) -> list[torch.Tensor]:
        """Per-backbone inputs for one pair (runs in DataLoader workers)."""
        image = _as_pil(image)
        return [b.prepare(image, text) for b in self.backbones]

    @torch.inference_mode()
    def features_prepared(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """[B, feature_dim] concatenated raw backbone features of a collated ``preprocess`` batch: the
        head's input, and what the distillation's feature cache stores."""
        return torch.cat([b.forward(x.to(self.device)).float() for b, x in zip(self.backbones, inputs)], dim=-1)

    @torch.inference_mode()
    def embed_features(self, features: torch.Tensor | np.ndarray, role: Literal["query", "item"] = "item"
                       ) -> np.ndarray:
        """Vectors from backbone features: the head, or (untuned) each backbone's part normalised."""
        features = torch.as_tensor(features, dtype=torch.float32, device=self.device)
        if self.head is None:
            parts = features.split([b.dim for b in self.backbones], dim=-1)
            vectors = F.normalize(torch.cat([F.normalize(f, dim=-1) for f in parts], dim=-1), dim=-1)
        else:
            vectors = F.normalize(self.head(features), dim=-1)
        if role == "query":
            vectors = vectors * self.orientation
        return vectors.cpu().numpy().astype(np.float32)

    def embed_prepared(self, inputs: Sequence[torch.Tensor], role: Literal["query", "item"] = "item") -> np.ndarray:
        """Embed a collated batch of ``preprocess`` outputs."""
        return self.embed_features(self.features_prepared(inputs), role)

    def features(self, images: Sequence, texts: Sequence[str]) -> np.ndarray:
        """[n, feature_dim] raw backbone features of (image, text) pairs, in batches."""
        if len(images) != len(texts):
            raise FastattrError(f"got {len(images)} images but {len(texts)} texts; pass one text per image")
        out = [np.zeros((0, self.feature_dim), np.float32)]
        for start in range(0, len(images), self.spec.batch_size):
            pairs = [self.preprocess(i, t) for i, t in zip(images[start:start + self.spec.batch_size],
                                                            texts[start:start + self.spec.batch_size])]
            out.append(self.features_prepared([torch.stack(x) for x in zip(*pairs)]).cpu().numpy())
        return np.concatenate(out)

    def embed(self, images: Sequence, texts: Sequence[str], role: Literal["query", "item"] = "item") -> np.ndarray:
        """Embed pairs in batches of ``spec.batch_size``; images as PIL, uint8 arrays or tensors."""
        if len(images) != len(texts):
            raise FastattrError(f"got {len(images)} images but {len(texts)} texts; pass one text per image")
        out = []
        for start in range(0, len(images), self.spec.batch_size):
            pairs = [self.preprocess(i, t) for i, t in zip(images[start:start + self.spec.batch_size],
                                                            texts[start:start + self.spec.batch_size])]
            out.append(self.embed_prepared([torch.stack(x) for x in zip(*pairs)], role))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    # -- identity ----------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """sha256 of the spec and every weight/tokenizer file (independent of where files live)."""
        if self._fingerprint is None:
            self._fingerprint = self._digest(with_head=True)
        return self._fingerprint

    @property
    def backbone_fingerprint(self) -> str:
        """The same over the backbones alone: what their features (the feature cache) depend on."""
        return self._digest(with_head=False)

    def _digest(self, with_head: bool) -> str:
        spec = to_dict(self.spec)
        files = []
        for b in spec["backbones"]:  # paths do not identify an encoder; file contents do
            if b["output"] == "embedding":  # the default: fingerprints of specs from before the key stay
                del b["output"]
            for key in ("model", "weights", "tokenizer"):
                ref = self.reference(b[key])
                if ref is not None and ref.local:
                    files += ref.files()
                    b[key] = "<local>"
        if self.spec.head and with_head:
            files += self.reference(self.spec.head).files()
        if with_head:
            spec["head"] = "<local>" if spec["head"] else None
        else:
            spec = {"backbones": spec["backbones"]}
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
        for f in sorted(files, key=lambda p: p.name):
            digest.update(f.name.encode() + sha256_file(f).encode())
        return "sha256:" + digest.hexdigest()

    def describe(self) -> dict:
        return {"name": self.spec.name, "fingerprint": self.fingerprint, "dim": self.dim,
                "tuned": self.head is not None}


def _as_pil(image) -> Image.Image:
    """RGB, within the manifest's pixel and aspect limits (a 3,000,000 x 1 strip would need gigabytes
    once resized to the backbones' short side)."""
    if isinstance(image, Image.Image):
        check_image_size(*image.size, "image to embed", "it")
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = image.permute(1, 2, 0)  # CHW -> HWC
        image = image.float().numpy()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise FastattrError(f"image array must be HxWxC with C in 1/3/4, got shape {image.shape}")
        check_image_size(image.shape[1], image.shape[0], "image to embed", "it")
        if image.dtype != np.uint8:  # floats in [0, 1]
            image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
        return Image.fromarray(image[..., :3] if image.shape[-1] != 1 else image[..., 0]).convert("RGB")
    raise FastattrError(f"unsupported image type {type(image).__name__}; pass PIL images, numpy arrays or tensors")


class _Backbone:
    spec: BackboneSpec
    dim: int

    def prepare(self, image: Image.Image, text: str) -> torch.Tensor: ...
    def forward(self, batch: torch.Tensor) -> torch.Tensor: ...


class _OpenClipBackbone(_Backbone):
    def __init__(self, spec: BackboneSpec, encoder: Encoder):
        self.spec = spec
        model = str(encoder.reference(spec.model))
        weights = encoder.reference(spec.weights)
        self.model, self.transform = encoder._open_clip(model, None if weights is None else str(weights))
        self.is_image = spec.kind == "open_clip_image"
        self.dim = int(self.model.visual.output_dim)  # CLIP: both towers project to embed_dim
        if spec.output == "tokens" and self.is_image:
            visual = self.model.visual
            if not hasattr(visual, "_pool") or getattr(visual, "pool_type", None) != "tok":
                raise FastattrError(f"open_clip model '{spec.model}': output 'tokens' needs a ViT image tower with "
                                    f"a class token; use output: embedding")
            self.dim = 2 * int(visual.transformer.width)
        elif spec.output == "tokens":
            if not hasattr(self.model, "token_embedding") or \
                    getattr(self.model, "text_pool_type", None) not in ("argmax", "eos"):
                raise FastattrError(f"open_clip model '{spec.model}': output 'tokens' needs a CLIP text tower pooled "
                                    f"at its end token; use output: embedding")
            self.dim = 2 * int(self.model.transformer.width)
        if not self.is_image:
            self.context_length = int(self.model.context_length)
            if spec.tokenizer:
                from transformers import AutoTokenizer

                self.hf_tokenizer = AutoTokenizer.from_pretrained(str(encoder.reference(spec.tokenizer).value),
                                                                  local_files_only=True)
            else:
                import open_clip

                self.hf_tokenizer = None
                self.oc_tokenizer = open_clip.get_tokenizer(model, context_length=self.context_length)

    def prepare(self, image: Image.Image, text: str) -> torch.Tensor:
        if self.is_image:
            return self.transform(image)
        if self.hf_tokenizer is not None:  # truncated to the model's context length
            return self.hf_tokenizer(text, padding="max_length", max_length=self.context_length, truncation=True,
                                     return_tensors="pt").input_ids[0]
        return self.oc_tokenizer([text])[0]

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.spec.output == "tokens":
            return self._image_tokens(batch) if self.is_image else self._text_tokens(batch)
        return self.model.encode_image(batch) if self.is_image else self.model.encode_text(batch)

    def _image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        cls, patches = visual._pool(visual.transformer(visual._embeds(images)))
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)

    def _text_tokens(self, text: torch.Tensor) -> torch.Tensor:
        """CLIP.encode_text up to its projection; the mean runs over the prompt up to its end token."""
        model = self.model
        x = (model.token_embedding(text) + model.positional_embedding).to(model.transformer.get_cast_dtype())
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        end = text.argmax(dim=-1) if model.text_pool_type == "argmax" else \
            (text == model.text_eos_id).int().argmax(dim=-1)
        prompt = (torch.arange(text.shape[1], device=text.device) <= end[:, None]).unsqueeze(-1)
        mean = (x * prompt).sum(dim=1) / prompt.sum(dim=1)
        return torch.cat([x[torch.arange(len(text), device=text.device), end], mean], dim=-1)


class _TimmBackbone(_Backbone):
    """A timm image model's pooled (CLS) features, e.g. DINO ViT-B/16 = vit_base_patch16_224.dino."""

    def __init__(self, spec: BackboneSpec, encoder: Encoder):
        import timm
        from torchvision import transforms

        self.spec = spec
        kwargs = {"num_classes": 0}
        ref = encoder.reference(spec.weights)
        weights = None if ref is None else ref.value
        if ref is not None:
            if not ref.local or not Path(weights).is_file():
                raise FastattrError(f"timm weights not found: {weights}; 'weights' of a timm_image backbone must be a "
                                    f"local file (safetensors or .pth)")
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": weights})
        try:
            self.model = timm.create_model(spec.model, **kwargs).to(encoder.device).eval()
        except RuntimeError as exc:
            raise FastattrError(f"cannot build timm model '{spec.model}' from {weights}: {exc}") from None
        self.dim = int(self.model.num_features)
        self.transform = transforms.Compose([
            transforms.Resize(spec.resize, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(spec.crop),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def prepare(self, image: Image.Image, text: str) -> torch.Tensor:
        return self.transform(image)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch)
