"""The captioner: a CNN Encoder, a Decoder that owns its conditioning and its step, and the Captioner around them.

Every decoder has the same seam: `start(features) -> (logits, state)` and `step(tokens, state) -> (logits, state)`,
with a state that can `select(index)` (beams keep or repeat rows through it); decoding (captioner/decode.py) and training use only these."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin

from .config import CaptionerConfig
from .hub import WEIGHTS_FILE, ModelLoadError, read_folder, resolve, save_folder
from .preprocess import preprocess
from .vocab import Vocabulary

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


@dataclass(frozen=True)
class ImageFeatures:
    """What the encoder hands a decoder for a batch of images; what each field holds is the architecture's business.

    `vector` is the projected, pooled image feature (B, E). Decoders that attend add `grid`, the backbone's
    spatial map as regions (B, N, F). `decode.encode(model, image)` makes one; `stream(features=...)` reuses it.
    """

    vector: torch.Tensor  # (B, E)
    grid: torch.Tensor | None = None  # (B, N, F) or None
    # With an ImageNet head (config.imagenet_head), in eval mode: the backbone's own ImageNet class probabilities
    # (B, 1000), softmax of its classifier on the pooled feature: what the CNN sees (captioner.imagenet reads them).
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.vector.size(0)

    def _map(self, fn) -> "ImageFeatures":
        return ImageFeatures(fn(self.vector), *(None if x is None else fn(x) for x in (self.grid, self.labels)))

    def select(self, index: torch.Tensor | slice) -> "ImageFeatures":
        """The rows `index` (a slice or a LongTensor of rows, repeats allowed)."""
        return self._map((lambda x: x[index]) if isinstance(index, slice) else (lambda x: x.index_select(0, index.to(x.device))))

    def to(self, device) -> "ImageFeatures":
        return self._map(lambda x: x.to(device))


IMAGENET_CLASSES = 1000


class Dropout(nn.Dropout):
    """nn.Dropout with its mask drawn by `torch.rand` instead of `bernoulli_`: the same distribution, but on this
    project's CPUs bernoulli_ costs about 4.5x more (68 against 15 ms for a (128, 49, 512) batch of regions), which
    was a tenth of an attention training step. No parameters: saved models are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape, device=x.device) >= self.p  # (same shape as x)
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


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


@dataclass(frozen=True)
class LSTMState:
    """A decoder's recurrent state for a batch: LSTM (h, c), each (num_layers, B, H). Beam search reorders it."""

    h: torch.Tensor
    c: torch.Tensor
    attention = None  # show-tell looks at no region

    def select(self, index: torch.Tensor) -> "LSTMState":
        """Rows `index` of the batch, in that order (beam search keeps the surviving hypotheses)."""
        return LSTMState(self.h.index_select(1, index), self.c.index_select(1, index))

class DecoderState(Protocol):
    """What a decoder's state offers decoding, whatever else it holds."""

    attention: torch.Tensor | None  # (B, N): the region weights behind the newest logits; None for decoders that do not attend

    def select(self, index: torch.Tensor) -> "DecoderState":
        """The batch rows `index`, in that order, repeats allowed (beam search keeps its surviving hypotheses)."""
        ...


class Decoder(Protocol):
    """The seam between a decoder and everything that decodes (greedy, beam, sampling, streaming, training's
    rollouts, the app): nothing reaches into a decoder's layers. A new architecture implements this and is added
    to DECODERS."""

    uses_grid: ClassVar[bool]  # True: it needs ImageFeatures.grid (the encoder then keeps the spatial map)
    compute_dtype: torch.dtype  # what its weights and state are in (Captioner.set_precision)

    def start(self, features: ImageFeatures) -> tuple[torch.Tensor, DecoderState]:
        """Condition on a batch of images: the logits (B, V) of the first word, and the state after it."""
        ...

    def step(self, tokens: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState]:
        """Feed the chosen words (B,): the next logits (B, V) and state."""
        ...

    def forward(self, features: ImageFeatures, captions: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: captions (T, B), <SOS> first -> logits (T, B, V)."""
        ...


class ShowTellDecoder(nn.Module):
    """Show and Tell (Vinyals et al. 2015): the image feature is the LSTM's input at t=0, <SOS> at t=1, then
    the caption's words. Embedding, sequence-first LSTM, linear to the vocabulary."""

    uses_grid = False  # the pooled vector is all it sees
    compute_dtype = torch.float32  # what its weights and state are in (Captioner.set_precision); logits come back float32

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.embed_size)
        self.lstm = nn.LSTM(
            config.embed_size,
            config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.dropout = Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, features: ImageFeatures, captions: torch.Tensor) -> torch.Tensor:
        """Teacher forcing. captions (T, B) with <SOS> first -> logits (T, B, V).

        Inputs are [image, <SOS>, w1, ..., w_{T-2}]; output t predicts captions[t].
        """
        embeddings = self.dropout(self.embed(captions[:-1]))  # (T-1, B, E)
        inputs = torch.cat((features.vector.unsqueeze(0), embeddings), dim=0)  # (T, B, E)
        hiddens, _ = self.lstm(inputs)  # (T, B, H)
        return self.head(self.dropout(hiddens))  # (T, B, V)

    def start(self, features: ImageFeatures) -> tuple[torch.Tensor, LSTMState]:
        """Feed the image at t=0 and <SOS> at t=1, as in training -> logits for the first word (B, V), state."""
        _, state = self.advance(features.vector.to(self.compute_dtype), None)  # step 0 predicts <SOS>: ignored
        sos = torch.full((len(features),), Vocabulary.sos_id, dtype=torch.long, device=features.vector.device)
        return self.step(sos, state)

    def step(self, tokens: torch.Tensor, state: LSTMState) -> tuple[torch.Tensor, LSTMState]:
        """tokens (B,) -> logits for the next word (B, V), new state."""
        return self.advance(self.embed(tokens), state)  # embed: (B,) -> (B, E)

    def advance(self, x: torch.Tensor, state: LSTMState | None) -> tuple[torch.Tensor, LSTMState]:
        """One LSTM step on an input vector x (B, E) (an embedded word, or the image at t=0) -> logits (B, V), state."""
        # torch.lstm_cell on nn.LSTM's own weights: the same maths, but for one token nn.LSTM goes through
        # oneDNN's RNN kernel, which costs several times more per call on a CPU.
        lstm = self.lstm
        if state is None:
            zeros = x.new_zeros(lstm.num_layers, x.size(0), lstm.hidden_size)
            state = LSTMState(zeros, zeros)
        hs, cs = [], []
        for layer in range(lstm.num_layers):
            if layer:
                x = F.dropout(x, lstm.dropout, self.training)  # as nn.LSTM does between layers
            x, c_layer = torch.lstm_cell(
                x, (state.h[layer], state.c[layer]),
                getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}"),
                getattr(lstm, f"bias_ih_l{layer}"), getattr(lstm, f"bias_hh_l{layer}"),
            )  # (B, H)
            hs.append(x)
            cs.append(c_layer)
        return self.head(x).float(), LSTMState(torch.stack(hs), torch.stack(cs))  # (B, V), ((L, B, H), (L, B, H))


@dataclass(frozen=True)
class AttendState:
    """The attention decoder's state for a batch: LSTM (h, c) (B, H), the image's regions (B, N, R) and their
    attention keys (B, N, A), and the attention weights (B, N) of the step that made the latest logits."""

    h: torch.Tensor
    c: torch.Tensor
    regions: torch.Tensor
    keys: torch.Tensor
    attention: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> "AttendState":
        pick = lambda x: None if x is None else x.index_select(0, index)  # noqa: E731
        return AttendState(pick(self.h), pick(self.c), pick(self.regions), pick(self.keys), pick(self.attention))

class AttendDecoder(nn.Module):
    """Show, Attend and Tell (Xu et al. 2015), soft attention: at every word the LSTM state weighs the image's
    regions (softmax over the N regions), and the gated weighted sum enters the LSTM with the previous word. The
    initial state comes from the pooled image vector. The score (config.attention_score) is a scaled dot product of
    a query from the LSTM state with each region's key (Luong et al. 2015's "general" score; the bundled model), or
    Xu's one-hidden-layer MLP, which builds a (B, N, A) tanh activation at every word (in float32 a training batch
    cost about 30% more; docs/experiments.md compares the two in bf16)."""

    uses_grid = True
    compute_dtype = torch.float32  # what its weights and state are in (Captioner.set_precision); logits come back float32

    def __init__(self, config: CaptionerConfig, feature_size: int):
        super().__init__()
        E, H, A = config.embed_size, config.hidden_size, config.attention_size
        R = config.region_size or E
        self.regions = nn.Linear(feature_size, R)  # each region's backbone feature -> R
        self.key = nn.Linear(R, A)  # region -> attention key
        self.query = nn.Linear(H, A)  # LSTM state -> attention query
        # config.attention_score "mlp": Xu's score w . tanh(key + query) instead of the scaled dot product
        self.score = nn.Linear(A, 1) if config.attention_score == "mlp" else None
        self.gate = nn.Linear(H, R)  # Xu's beta: how much of the context enters this step
        self.init_h = nn.Linear(E, H)
        self.init_c = nn.Linear(E, H)
        self.embed = nn.Embedding(config.vocab_size, E)
        self.cell = nn.LSTMCell(E + R, H)
        self.dropout = Dropout(config.dropout)
        self.head = nn.Linear(H, config.vocab_size)

    def init_state(self, features: ImageFeatures) -> AttendState:
        grid, vector = features.grid.to(self.compute_dtype), features.vector.to(self.compute_dtype)
        regions = self.dropout(F.relu(self.regions(grid)))  # (B, N, R)
        return AttendState(torch.tanh(self.init_h(vector)), torch.tanh(self.init_c(vector)),  # (B, H) each
                           regions, self.key(regions))  # keys (B, N, A)

    def recur(self, embedded: torch.Tensor, state: AttendState) -> AttendState:
        """One LSTM step on an embedded word (B, E) -> the new state (with this step's attention weights)."""
        if self.score is None:
            query = self.query(state.h).unsqueeze(2)  # (B, A, 1)
            energy = torch.bmm(state.keys, query).squeeze(2) * state.keys.size(2) ** -0.5  # (B, N)
        else:
            energy = self.score(torch.tanh(state.keys + self.query(state.h).unsqueeze(1))).squeeze(2)  # (B, N, A) -> (B, N)
        alpha = torch.softmax(energy, dim=1)  # (B, N)
        context = torch.bmm(alpha.unsqueeze(1), state.regions).squeeze(1)  # (B, R)
        context = torch.sigmoid(self.gate(state.h)) * context  # (B, R)
        h, c = self.cell(torch.cat((embedded, context), dim=1), (state.h, state.c))  # (B, H) each
        return AttendState(h, c, state.regions, state.keys, alpha)

    def advance(self, embedded: torch.Tensor, state: AttendState) -> tuple[torch.Tensor, AttendState]:
        """One step on an embedded word (B, E) -> logits (B, V), state (with this step's attention weights)."""
        state = self.recur(embedded, state)
        return self.head(self.dropout(state.h)).float(), state

    def start(self, features: ImageFeatures) -> tuple[torch.Tensor, AttendState]:
        """Initial state from the image, then <SOS> -> logits for the first word (B, V), state."""
        sos = torch.full((len(features),), Vocabulary.sos_id, dtype=torch.long, device=features.vector.device)
        return self.step(sos, self.init_state(features))

    def step(self, tokens: torch.Tensor, state: AttendState) -> tuple[torch.Tensor, AttendState]:
        return self.advance(self.embed(tokens), state)  # embed: (B,) -> (B, E)

    def forward(self, features: ImageFeatures, captions: torch.Tensor) -> torch.Tensor:
        """Teacher forcing, aligned as Show and Tell's: captions (T, B) -> logits (T, B, V), output t predicts captions[t].
        Output 0 is the initial state's guess (it learns <SOS>); output t >= 1 follows word t-1."""
        state = self.init_state(features)
        embedded = self.dropout(self.embed(captions[:-1]))  # (T-1, B, E)
        hiddens = [state.h]  # t=0: (B, H)
        for word in embedded:
            state = self.recur(word, state)
            hiddens.append(state.h)
        # The vocabulary projection (the largest matrix) and its dropout once over all steps, not once per step.
        return self.head(self.dropout(torch.stack(hiddens)))  # (T, B, H) -> (T, B, V)


# The decoders a saved config can name (CaptionerConfig.decoder): the one registry.
DECODERS: dict[str, type[Decoder]] = {"show-tell": ShowTellDecoder, "attend": AttendDecoder}


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
            from .int8 import quantize

            # The attention decoder: the layers every word runs on the LSTM state (the cell, the attention's query and
            # gate); the vocabulary projection and the once-per-image region layers stay float32. Measured on dev with
            # the bundled model (dynamic quantization, issue 21): quantizing the projection too left 929 of 1,000 greedy
            # captions unchanged, without it 959. Show-and-Tell steps nn.LSTM's own weights through torch.lstm_cell, so
            # its LSTM stays float32 and its projection is what int8 can take. Each row is quantized by its own scale
            # (captioner/int8.py): a batch decodes together and every row gets the numbers it gets alone.
            quantize(self.decoder, ("cell", "query", "gate") if self.decoder.uses_grid else ("head",))
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
