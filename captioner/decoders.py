"""The decoders and the seam they share with everything that decodes: `start(features) -> (logits, state)` and
`step(tokens, state) -> (logits, state)`, with a state that can `select(index)` (beams keep or repeat rows through
it). Their input is ImageFeatures, what the Encoder (captioner/model.py) gives for a batch of images."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import CaptionerConfig
from .vocab import Vocabulary


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


class Dropout(nn.Dropout):
    """nn.Dropout with its mask drawn by `torch.rand` instead of `bernoulli_`: the same distribution, drawn several
    times faster on CPUs (docs/performance.md, "Measurements behind the code"). No parameters: saved models are
    unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape, device=x.device) >= self.p  # (same shape as x)
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


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
    Xu's one-hidden-layer MLP, which builds a (B, N, A) tanh activation at every word, so its training batches cost
    more (docs/experiments.md compares the two)."""

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
