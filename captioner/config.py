"""Every hyperparameter of a captioner, and the preprocessing that travels with its weights."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

# Bumped when the saved format changes in a way older code cannot read.
FORMAT_VERSION = 1


@dataclass
class CaptionerConfig:
    # --- encoder ---
    backbone: str = "tf_efficientnet_lite0"  # any timm model name; built without downloading weights
    embed_size: int = 512  # size of the image feature and of the word embeddings
    train_backbone: bool = False  # False freezes the CNN (and its batch-norm statistics)
    imagenet_head: bool = False  # keep the backbone's 1000-class ImageNet classifier (encoder.classifier): the
    #                              labels the CNN sees, and guided decoding's evidence; never trained
    # --- decoder ---
    decoder: str = "show-tell"  # a name in model.DECODERS: "show-tell", the image at t=0 only (the seed's reference
    #                             design); "attend", soft attention over the backbone's spatial map at every word (Xu
    #                             et al. 2015; the bundled model); an unknown name fails when the model is built
    attention_size: int = 512  # attend: size of the attention's keys and queries
    attention_score: str = "dot"  # attend: "dot", a scaled dot product of query and key (Luong's "general"); "mlp",
    #                               Xu et al.'s one-hidden-layer score w . tanh(key + query)
    region_size: int = 0  # attend: each region's projected size (what the context vector has); 0 = embed_size
    hidden_size: int = 512  # LSTM hidden state size
    num_layers: int = 1  # stacked LSTM layers
    dropout: float = 0.5  # on the image projection, the embeddings and the LSTM output
    vocab_size: int = 4  # must equal len(vocabulary); 4 = specials only
    # --- preprocessing (what the weights were trained to see) ---
    image_size: int = 224  # the square side the encoder sees
    resize: str = "squash"  # "squash": resize straight to size; "crop": shorter side, then centre crop
    crop_pct: float = 0.875  # for resize="crop": centre crop covers this share of the resized shorter side
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel normalisation (Lite0 expects 0.5/0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # --- decoding defaults ---
    max_len: int = 20  # most words a caption may have
    # --- bookkeeping ---
    format_version: int = FORMAT_VERSION  # the saved format; newer than this code is refused
    extra: dict = field(default_factory=dict)  # free-form notes (training run, metrics); never read by code paths

    def __post_init__(self) -> None:
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if self.attention_score not in ("dot", "mlp"):
            raise ValueError(f"attention_score={self.attention_score!r}: expected 'dot' or 'mlp'")
        if self.region_size < 0:
            raise ValueError(f"region_size={self.region_size}: expected 0 (= embed_size) or more")
        if self.resize not in ("squash", "crop"):
            raise ValueError(f"resize={self.resize!r}: expected 'squash' or 'crop'")
        if self.image_size < 8:
            raise ValueError(f"image_size={self.image_size}: expected at least 8 pixels")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}: expected a value in [0, 1)")
        if self.vocab_size < 4:
            raise ValueError(f"vocab_size={self.vocab_size}: expected at least the 4 special tokens")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CaptionerConfig":
        """Build from a saved config.json; a config written by a newer version, or missing a field, is refused."""
        version = data.get("format_version", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"this model's config has format_version={version!r}, newer than this captioner "
                f"(reads up to {FORMAT_VERSION}); upgrade captioner (pip install -U -r requirements.txt)"
            )
        names = {f.name for f in fields(cls)}
        # added later, with defaults: older configs are show-tell, attend ones dot-product with regions of embed_size
        required = names - {"extra", "format_version", "decoder", "attention_size", "imagenet_head", "attention_score", "region_size"}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"config.json is missing field(s) {missing}; the model folder is incomplete or not a captioner")
        return cls(**{k: v for k, v in data.items() if k in names})
