"""Section 5: feature extraction (what train/features.py does) and teacher-forcing training on cached features."""
from __future__ import annotations

import copy

import torch

from captioner.model import caption_loss
from captioner.preprocess import preprocess

from .common import Settings, measure, measure_interleaved

MAX_TOKENS = 22  # train.TrainConfig.max_tokens: the longest training caption, <SOS>/<EOS> included
BATCH = 128  # train.TrainConfig.batch_size


def run(model, s: Settings, images: list[str], image_source: str) -> dict:
    cfg = model.config
    rows = []
    n = len(images)

    # --- feature extraction: preprocess a batch of real images, then encoder.backbone_features on it
    st = measure(lambda: torch.stack([preprocess(p, cfg) for p in images]), warmup=1, repeat=max(1, s.repeat // 5))
    rows.append({"stage": f"preprocess {n} JPEG files", "images_per_s": round(n / (st.median_ms / 1e3), 1), "median_ms": round(st.median_ms, 1),
                 "note": image_source})
    batch = torch.stack([preprocess(p, cfg) for p in images])  # (n, 3, S, S)

    def feats():
        with torch.inference_mode():
            model.encoder.backbone_features(batch)

    st = measure(feats, warmup=1, repeat=max(1, s.repeat // 5))
    rows.append({"stage": f"encoder.backbone_features, batch {n}", "images_per_s": round(n / (st.median_ms / 1e3), 1),
                 "median_ms": round(st.median_ms, 1), "note": f"{cfg.backbone}, current code"})

    # --- teacher forcing on cached features: forward_features + loss + backward + AdamW, batch 128
    torch.manual_seed(0)
    trainee = copy.deepcopy(model).train()
    trainee.encoder.set_trainable(False)
    with torch.inference_mode():
        shape = model.encoder.backbone_features(batch[:1]).shape[1:]  # (F,) pooled, or (N, F) regions for attention
    features = torch.randn(BATCH, *shape)
    captions = torch.randint(4, cfg.vocab_size, (MAX_TOKENS, BATCH))
    captions[0] = model.vocab.sos_id
    params = [p for p in trainee.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def train_step(onednn: bool = True):
        with torch.backends.mkldnn.flags(enabled=onednn):
            logits = trainee.forward_features(features, captions)  # (T, B, V)
            loss = caption_loss(logits, captions, pad_id=model.vocab.pad_id, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()

    # --tune-top-stages N: the same step from cached maps, through the backbone's last N stages (trained too)
    from train.features import split_backbone

    tuned = {}
    tops = () if model.decoder.uses_grid else (1, 2)  # the tuned top stages feed a pooled vector: Show-and-Tell only
    for n_top in tops:
        bottom, top = split_backbone(trainee.encoder.backbone, n_top)
        with torch.inference_mode():
            maps = bottom(batch)  # (n, C, H, W)
        maps = maps[torch.arange(BATCH) % len(maps)].clone()  # (BATCH, C, H, W): each caption row its image's map
        top_params = list(top.parameters())
        top_opt = torch.optim.AdamW(top_params, lr=1e-5)

        def tuned_step(top=top, maps=maps, top_params=top_params, top_opt=top_opt):
            for q in top_params:
                q.requires_grad_(True)
            logits = trainee.forward_features(top(maps), captions)  # (T, B, V)
            loss = caption_loss(logits, captions, pad_id=model.vocab.pad_id, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            top_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params + top_params, 5.0)
            opt.step()
            top_opt.step()
            for q in top_params:
                q.requires_grad_(False)

        tuned[f"top{n_top}"] = tuned_step
    st = measure_interleaved({"onednn": train_step, "native": lambda: train_step(False), **tuned}, warmup=1, repeat=s.train_steps)
    for key, label in (("onednn", "current code (nn.LSTM via oneDNN)"), ("native", "oneDNN off (torch.backends.mkldnn.flags)")):
        rows.append({"stage": f"training step on cached features, batch {BATCH}, {MAX_TOKENS} tokens",
                     "captions_per_s": round(BATCH / (st[key].median_ms / 1e3), 1), "median_ms": round(st[key].median_ms, 1), "note": label})
    for n_top in tops:
        rows.append({"stage": f"training step on cached maps, last {n_top} CNN stage(s) + head conv trained too, batch {BATCH}",
                     "captions_per_s": round(BATCH / (st[f"top{n_top}"].median_ms / 1e3), 1),
                     "median_ms": round(st[f"top{n_top}"].median_ms, 1), "note": f"--tune-top-stages {n_top}"})
    return {"rows": rows, "note": f"training: {s.train_steps} AdamW steps per variant after 1 warm-up, interleaved; random features and captions"}
