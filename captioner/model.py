"""Show-and-Tell captioner: a CNN Encoder, an LSTM Decoder that owns its step, and the Captioner around them."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin

from .config import CaptionerConfig
from .vocab import Vocabulary

State = tuple[torch.Tensor, torch.Tensor]  # LSTM (h, c), each (num_layers, B, H)
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
    """CNN backbone, global-pooled, then Linear + ReLU + Dropout to the embedding size."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        if config.backbone == "tf_efficientnet_lite0":
            from .lite0 import EfficientNetLite0  # timm's model, state dict included, without timm's import cost

            self.backbone = EfficientNetLite0()
        else:
            import timm  # heavy import kept local to model construction

            # pretrained=False: building a model never downloads; weights come from a checkpoint.
            self.backbone = timm.create_model(config.backbone, pretrained=False, num_classes=0)
        self.proj = nn.Linear(self.backbone.num_features, config.embed_size)
        self.dropout = nn.Dropout(config.dropout)
        self.set_trainable(config.train_backbone)

    def set_trainable(self, trainable: bool) -> None:
        self.train_backbone = trainable
        self.backbone.requires_grad_(trainable)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.train_backbone:
            self.backbone.eval()  # a frozen backbone keeps its batch-norm statistics
        return self

    def optimize_for_inference(self, image_size: int) -> "Encoder":
        """Build an inference copy of the backbone: batch norm folded into the convolutions, channels_last.
        Used only when autograd is off and the input has the model's own size; training and the state dict keep
        the original. Call again after loading other weights."""
        fast = _fuse_conv_bn(self.backbone).to(memory_format=torch.channels_last)
        self.__dict__["_fast"] = (fast, image_size)  # a plain attribute: not a submodule, never saved
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, F) pooled backbone features (what the feature cache stores)."""
        fast = self.__dict__.get("_fast")
        if fast is not None and not torch.is_grad_enabled() and images.dim() == 4 and images.shape[-1] == images.shape[-2] == fast[1]:
            images = images.contiguous(memory_format=torch.channels_last)
            return torch.cat([fast[0](chunk) for chunk in images.split(ENCODER_CHUNK)])  # (B, F)
        return self.backbone(images)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) -> (B, E)"""
        return self.dropout(F.relu(self.proj(features)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(images))  # (B, E)


class Decoder(nn.Module):
    """Embedding, sequence-first LSTM, linear to the vocabulary."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.embed_size)
        self.lstm = nn.LSTM(
            config.embed_size,
            config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, features: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """Teacher forcing. features (B, E), captions (T, B) with <SOS> first -> logits (T, B, V).

        Inputs are [image, <SOS>, w1, ..., w_{T-2}]; output t predicts captions[t].
        """
        embeddings = self.dropout(self.embed(captions[:-1]))  # (T-1, B, E)
        inputs = torch.cat((features.unsqueeze(0), embeddings), dim=0)  # (T, B, E)
        hiddens, _ = self.lstm(inputs)  # (T, B, H)
        return self.head(self.dropout(hiddens))  # (T, B, V)

    def step(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """One decoding step. x: token ids (B,) or an image feature (B, E) -> logits (B, V), new state."""
        if not x.is_floating_point():
            x = self.embed(x)  # (B,) -> (B, E)
        # torch.lstm_cell on nn.LSTM's own weights: the same maths, but for one token nn.LSTM goes through
        # oneDNN's RNN kernel, which costs several times more per call on a CPU (benchmarks/PROPOSED.md).
        lstm = self.lstm
        if state is None:
            zeros = x.new_zeros(lstm.num_layers, x.size(0), lstm.hidden_size)
            state = (zeros, zeros)
        h, c = state  # each (L, B, H)
        hs, cs = [], []
        for layer in range(lstm.num_layers):
            if layer:
                x = F.dropout(x, lstm.dropout, self.training)  # as nn.LSTM does between layers
            x, c_layer = torch.lstm_cell(
                x, (h[layer], c[layer]),
                getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}"),
                getattr(lstm, f"bias_ih_l{layer}"), getattr(lstm, f"bias_hh_l{layer}"),
            )  # (B, H)
            hs.append(x)
            cs.append(c_layer)
        return self.head(x), (torch.stack(hs), torch.stack(cs))  # (B, V), ((L, B, H), (L, B, H))

    @staticmethod
    def select_state(state: State, index: torch.Tensor) -> State:
        """Reorder the batch of a state (beam search keeps the surviving beams)."""
        h, c = state
        return h.index_select(1, index), c.index_select(1, index)


class Captioner(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="captioner",
    tags=["image-captioning", "image-to-text", "lstm", "show-and-tell"],
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
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def forward(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S), captions (T, B) -> logits (T, B, V)."""
        return self.decoder(self.encoder(images), captions)

    def forward_features(self, features: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """Same as forward, from cached backbone features (B, F)."""
        return self.decoder(self.encoder.project(features), captions)

    def optimize_for_inference(self) -> "Captioner":
        """Eval mode plus the encoder's inference copy (fused batch norm, channels_last); captions are unchanged."""
        self.eval()
        self.encoder.optimize_for_inference(self.config.image_size)
        return self

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, E) image features for decoding."""
        return self.encoder(images)

    # Hub format: config.json + model.safetensors + vocab.json (see hub.py for loading).
    def _save_pretrained(self, save_directory) -> None:
        from .hub import save_folder

        save_folder(self, save_directory)

    @classmethod
    def from_pretrained(cls, src, *, revision: str | None = None, **kwargs) -> "Captioner":
        """Load from a local folder or a Hub repo id (optionally at a revision); see hub.load."""
        from .hub import load

        return load(src, revision=revision, **kwargs)


def caption_loss(logits: torch.Tensor, captions: torch.Tensor, *, pad_id: int = 0, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of logits (T, B, V) against captions (T, B), ignoring <PAD>."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),  # (T*B, V)
        captions.reshape(-1),  # (T*B,)
        ignore_index=pad_id,
        label_smoothing=label_smoothing,
    )
