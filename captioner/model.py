"""The captioner: a CNN Encoder, a Decoder that owns its conditioning and its step (captioner/decoders.py: the seam
`start`/`step` that decoding and training use), and the Captioner around them."""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin

from .config import CaptionerConfig
from .decoders import DECODERS as DECODERS
from .decoders import AttendDecoder as AttendDecoder
from .decoders import Decoder as Decoder
from .decoders import Dropout, ImageFeatures
from .decoders import ShowTellDecoder as ShowTellDecoder
from .hub import WEIGHTS_FILE, ModelLoadError, read_folder, resolve, save_folder
from .preprocess import preprocess
from .vocab import Vocabulary

IMAGENET_CLASSES = 1000
ENCODER_CHUNK = 8  # images per backbone call on the inference path: 32 at 224x224 overflow the CPU caches


def _fuse_conv_bn(module: nn.Module) -> nn.Module:
    """An eval copy of `module` with each conv directly followed by a batch norm folded into that conv.
    A norm that also activates (timm's BatchNormAct2d: .drop, .act; lite0.BatchNormAct: .act) keeps those parts;
    duck-typed, so folding the built-in Lite0 never imports timm."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    module = copy.deepcopy(module).eval()

    def visit(parent: nn.Module) -> None:
        kids = list(parent.named_children())
        for i, (name, child) in enumerate(kids):
            prev_name, prev = kids[i - 1] if i else (None, None)
            if isinstance(child, nn.BatchNorm2d) and isinstance(prev, nn.Conv2d) and child.track_running_stats:
                setattr(parent, prev_name, fuse_conv_bn_eval(prev, child))
                rest = [m for m in (getattr(child, "drop", None), getattr(child, "act", None)) if isinstance(m, nn.Module)]
                setattr(parent, name, nn.Sequential(*rest) if rest else nn.Identity())
            else:
                visit(child)

    visit(module)
    return module


class Encoder(nn.Module):
    """CNN backbone, global-pooled, then Linear + ReLU + Dropout to the embedding size; with `spatial`, the
    backbone's last map is kept too, as regions for a decoder that attends. With `config.imagenet_head`, the
    backbone's ImageNet classifier is kept as `classifier` (never trained): in eval mode every image's features
    carry its ImageNet class probabilities (`ImageFeatures.labels`), one small matrix product on the pooled feature."""

    def __init__(self, config: CaptionerConfig, *, spatial: bool = False):
        super().__init__()
        self.spatial = spatial
        from .lite0 import VARIANTS, build  # timm's Lite0/1/2, state dict included, without timm's import cost

        if config.backbone in VARIANTS:
            self.backbone = build(config.backbone)
        else:
            import timm  # heavy import kept local to model construction

            # pretrained=False: building a model never downloads; weights come from a checkpoint.
            self.backbone = timm.create_model(config.backbone, pretrained=False, num_classes=0)
        self.proj = nn.Linear(self.backbone.num_features, config.embed_size)
        self.dropout = Dropout(config.dropout)
        self.classifier: nn.Linear | None = None
        if config.imagenet_head:
            # Built on the meta device, then zeroed: no random draws, so a seeded build's projection and decoder are
            # the same with or without the head. Its weights come from a checkpoint or train.backbones.init_backbone.
            head = nn.Linear(self.backbone.num_features, IMAGENET_CLASSES, device="meta").to_empty(device="cpu")
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            self.classifier = head.requires_grad_(False)
        self.set_trainable(config.train_backbone)

    def set_trainable(self, trainable: bool) -> None:
        self.train_backbone = trainable
        self.backbone.requires_grad_(trainable)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.train_backbone:
            self.backbone.eval()  # a frozen backbone keeps its batch-norm statistics
        return self

    def optimize_for_inference(self, image_size: int, dtype: torch.dtype = torch.float32,
                               runtime: str = "torch") -> "Encoder":
        """Build an inference copy of the backbone: batch norm folded into the convolutions, channels_last, its
        weights in `dtype` (bfloat16: half the bytes, and native maths on a CPU with AVX512-BF16/AMX; the features
        come back float32). Used only when autograd is off and the input has the model's own size; training and
        the state dict keep the original. Call again after loading other weights. `runtime` (captioner.runtime):
        "onnx" or "auto" run a float32 copy in ONNX Runtime, exported from these weights (auto: where installed)."""
        from . import runtime as runtimes

        runtime = runtimes.resolve(runtime)
        fast = _fuse_conv_bn(self.backbone).to(memory_format=torch.channels_last, dtype=dtype)
        self.__dict__["_fast"] = (fast, image_size, dtype)  # a plain attribute: not a submodule, never saved
        self.__dict__["_onnx"] = None
        if runtime == "onnx" or (runtime == "auto" and dtype == torch.float32 and runtimes.available()):
            if dtype != torch.float32:
                raise ValueError(f"runtime='onnx' with a {dtype} encoder: ONNX Runtime runs the float32 one")
            self.__dict__["_onnx"] = runtimes.onnx_backbone(fast, image_size, self.spatial)  # ImportError: absent
            self.__dict__["_fast"] = (None, image_size, dtype)  # the torch copy is not needed: its memory back
        return self

    @property
    def runtime(self) -> str:
        """What runs the backbone at inference: "onnx" or "torch"."""
        return "onnx" if self.__dict__.get("_onnx") is not None else "torch"

    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> what the training feature cache stores: pooled (B, F), or with `spatial` the last map as
        regions (B, N, F), N = (S/32)^2."""
        backbone = self.backbone
        fast = self.__dict__.get("_fast")
        run = None
        if fast is not None and not torch.is_grad_enabled() and images.dim() == 4 and images.shape[-1] == images.shape[-2] == fast[1]:
            run = self.__dict__.get("_onnx")  # ONNX Runtime: (b, N, F) / (b, F) from float32 images
            backbone = fast[0] if run is None else None
            images = images.to(dtype=fast[2], memory_format=torch.channels_last) if run is None else images
        if run is None:
            run = (lambda x: backbone.forward_features(x).flatten(2).transpose(1, 2)) if self.spatial else backbone  # (b, N, F) / (b, F)
        if backbone is self.backbone:
            return run(images)
        return torch.cat([run(chunk) for chunk in images.split(ENCODER_CHUNK)]).float().contiguous()  # (B, F) or (B, N, F)

    def from_backbone(self, x: torch.Tensor) -> ImageFeatures:
        """Backbone features, fresh or cached: pooled (B, F), or regions (B, N, F) -> the decoder's ImageFeatures."""
        if self.spatial:
            x = x.float()  # the cache may hold half precision
            pooled = x.mean(1)  # (B, F): the backbone's global average pool
            return ImageFeatures(self.dropout(F.relu(self.proj(pooled))), grid=x, labels=self.imagenet(pooled))  # vector (B, E), grid (B, N, F)
        return ImageFeatures(self.dropout(F.relu(self.proj(x))), labels=self.imagenet(x))  # vector (B, E)

    def imagenet(self, pooled: torch.Tensor) -> torch.Tensor | None:
        """Pooled backbone features (B, F) -> ImageNet class probabilities (B, 1000); None without a head, or while
        training (no decoder reads them)."""
        if self.classifier is None or self.training:
            return None
        with torch.no_grad():
            return torch.softmax(self.classifier(pooled.float()), dim=-1)

    def forward(self, images: torch.Tensor) -> ImageFeatures:
        return self.from_backbone(self.backbone_features(images))



class Captioner(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="captioner",
    tags=["image-captioning", "image-to-text", "lstm"],  # the architecture's tag is the model card's (train/export.py)
    pipeline_tag="image-to-text",
    license="apache-2.0",
):
    """Encoder + Decoder + the vocabulary they were trained with."""

    def __init__(self, config: CaptionerConfig, vocab: Vocabulary | None = None):
        super().__init__()
        if vocab is not None and len(vocab) != config.vocab_size:
            raise ValueError(
                f"vocabulary has {len(vocab)} words but the model's config says vocab_size={config.vocab_size}; "
                "a model must run with the vocabulary it was trained with"
            )
        self.config = config
        self.vocab = vocab
        if config.decoder not in DECODERS:
            raise ValueError(f"decoder={config.decoder!r}: expected one of {', '.join(DECODERS)}")
        decoder = DECODERS[config.decoder]
        self.encoder = Encoder(config, spatial=decoder.uses_grid)
        if self.encoder.spatial:
            self.decoder = decoder(config, self.encoder.backbone.num_features)
        else:
            self.decoder = decoder(config)

    def forward(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S), captions (T, B) -> logits (T, B, V)."""
        return self.decoder(self.encoder(images), captions)

    def forward_features(self, backbone_features: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """Same as forward, from cached backbone features (B, F)."""
        return self.decoder(self.encoder.from_backbone(backbone_features), captions)

    precision = "fp32"  # what set_precision chose: "fp32", or e.g. "encoder fp32, decoder int8"

    def optimize_for_inference(self, precision: str = "fp32", runtime: str = "torch") -> "Captioner":
        """Eval mode plus the encoder's inference copy (fused batch norm, channels_last), at `precision` (see
        set_precision; fp32 leaves captions unchanged), its backbone run by `runtime` (captioner.runtime)."""
        self.eval()
        return self.set_precision(precision, runtime=runtime)

    def set_precision(self, precision: str = "auto", *, runtime: str = "torch") -> "Captioner":
        """For inference only: run the encoder and the decoder at `precision` ('auto' | 'fp32' | 'bf16' | 'int8'; see
        captioner.precision.inference_plan, which picks each part's format for this CPU). bf16 keeps the decoder's
        weights and state in bfloat16; int8 quantizes its Linear (and the attention decoder's LSTM cell) weights to
        int8, each activation row quantized by its own scale (captioner/int8.py: batch-invariant). Logits and
        features stay float32 at the seam.
        A model set to anything but fp32 cannot be saved or trained: load it again for that."""
        from .precision import inference_plan

        encoder, decoder = inference_plan(precision, self.config.decoder)
        self.eval()
        if self.precision != "fp32":  # its float32 weights are gone: bf16 or int8 copies cannot give them back
            raise ValueError(f"set_precision({precision!r}) on a model already set to {self.precision}: load it again")
        self.encoder.optimize_for_inference(self.config.image_size, torch.bfloat16 if encoder == "bf16" else torch.float32,
                                            runtime if encoder == "fp32" or runtime != "auto" else "torch")
        if decoder == "bf16":
            self.decoder.to(torch.bfloat16)
            self.decoder.compute_dtype = torch.bfloat16
        elif decoder == "int8":
            from .int8 import per_image, quantize

            # The attention decoder: the layers every word runs on the LSTM state (the cell, the attention's query and
            # gate); the vocabulary projection and the once-per-image region layers stay float32: quantizing the
            # projection too changed more greedy dev captions (docs/performance.md). Show-and-Tell steps nn.LSTM's own
            # weights through torch.lstm_cell, so
            # its LSTM stays float32 and its projection is what int8 can take. Each row is quantized by its own scale
            # (captioner/int8.py): a batch decodes together and every row gets the numbers it gets alone.
            quantize(self.decoder, ("cell", "query", "gate") if self.decoder.uses_grid else ("head",))
            # The float layers before them run once per image: float32 kernels differ with the batch's size in the last
            # bits, which the int8 rows downstream can round apart (captioner/int8.py, PerImageLinear). The vocabulary
            # projection feeds no int8 layer (its last bits stay in the last bits of the logits) and costs the most.
            per_image(self.decoder, tuple(n for n, m in self.decoder.named_children() if type(m) is nn.Linear and n != "head"))
        self.precision = "fp32" if encoder == decoder == "fp32" else (
            encoder if encoder == decoder else f"encoder {encoder}, decoder {decoder}")
        return self

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> ImageFeatures:
        """(B, 3, S, S) preprocessed images -> ImageFeatures for decoding."""
        return self.encoder(images)

    # Hub format: config.json + model.safetensors + vocab.json.
    def _save_pretrained(self, save_directory) -> None:
        if self.precision != "fp32":
            raise ValueError(f"this model runs at {self.precision} for inference; load it again (precision fp32) to save it")
        save_folder(self, save_directory)

    @classmethod
    def from_pretrained(cls, src=None, *, revision: str | None = None, cache_dir=None, local_files_only: bool = False, token=None,
                        map_location: str = "cpu", **kwargs) -> "Captioner":
        """Load from a local folder or a Hub repo id (optionally at a revision), or with no `src` the model bundled with
        the package (a name that works from any folder); strict, never unpickles, and every failure is a
        ModelLoadError that says what to do."""
        if src is None:
            from .loading import DEFAULT_MODEL  # loading imports this module
            src = DEFAULT_MODEL
        folder = resolve(src, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        config, vocab, state = read_folder(folder, src, map_location=map_location)
        try:
            model = cls(config, vocab)
        except (RuntimeError, ValueError, KeyError) as e:  # e.g. timm: "Unknown model (...)" for an unknown backbone
            raise ModelLoadError(f"{src}: cannot build the model its config.json describes: {e}") from e
        expected = model.state_dict()
        unexpected = sorted(set(state) - set(expected))
        absent = sorted(set(expected) - set(state))
        if unexpected or absent:
            raise ModelLoadError(
                f"{src}: {WEIGHTS_FILE} does not match the config (missing {absent[:3]}{'...' if len(absent) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
            )
        bad = [k for k in expected if expected[k].shape != state[k].shape]
        if bad:
            raise ModelLoadError(f"{src}: tensor {bad[0]} has shape {tuple(state[bad[0]].shape)}, the config needs {tuple(expected[bad[0]].shape)}")
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
        model.eval()
        model.source = str(src)
        model.folder = folder  # where optional files beside the weights are read from (familiarity.ASSESS_FILE)
        model.revision = revision
        # For a Hub download the snapshot folder is named by the commit actually loaded (what "main" meant then).
        model.commit = folder.name if not os.path.isdir(os.fspath(src)) else None
        return model


def caption_loss(logits: torch.Tensor, captions: torch.Tensor, *, pad_id: int = 0, unk_id: int | None = None,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of logits (T, B, V) against captions (T, B), ignoring <PAD>, and <UNK> when `unk_id` is given.

    Decoding never emits <UNK>, so training never teaches it as a target: it stays in the softmax as a word the
    model learns not to predict, instead of soaking up the mass of every rare noun ("in front of a <UNK>") that
    decoding would then mask, leaving <EOS> to win and the caption cut off after "of a"."""
    targets = captions.reshape(-1)  # (T*B,)
    if unk_id is not None:
        targets = targets.masked_fill(targets == unk_id, pad_id)
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),  # (T*B, V)
        targets,
        ignore_index=pad_id,
        label_smoothing=label_smoothing,
    )


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def encode(model, image) -> ImageFeatures:
    """One image (a path, bytes, a PIL image, or a preprocessed (3, S, S) tensor) -> its ImageFeatures (batch 1)."""
    x = image if isinstance(image, torch.Tensor) else preprocess(image, model.config)  # (3, S, S)
    return model.encode(x.reshape(1, *x.shape[-3:]).to(device_of(model)))
