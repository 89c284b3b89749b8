"""Section 6: the same model at each inference precision (captioner.precision), and training steps in float32 against
bfloat16 autocast. Variants take turns call by call (measure_interleaved), so their ratios hold on a busy machine."""
from __future__ import annotations

import copy

import torch

from captioner.decode import caption, caption_batch, stream
from captioner.model import caption_loss
from captioner.precision import autocast, cpu_features, inference_plan
from captioner.preprocess import open_image, preprocess

from .common import Settings, measure_interleaved

PRECISIONS = ("fp32", "bf16", "int8", "auto")
MAX_TOKENS, BATCH = 22, 128  # train.TrainConfig.max_tokens and batch_size


def _first_word(model, x) -> None:
    gen = stream(model, x)
    next(gen)
    gen.close()


def inference(src: str | None, s: Settings, images: list[str]) -> dict:
    """Greedy caption (JPEG in), first streamed word, beam 3 and batch-32 throughput at every precision; and how many
    of the images' greedy captions match float32's."""
    from captioner.loading import load_model

    models = {p: load_model(src, precision=p) for p in PRECISIONS}
    x = preprocess(images[0], models["fp32"].config)
    pils = [open_image(p) for p in images]
    fns = {}
    for p, m in models.items():
        fns[f"{p} greedy"] = lambda m=m: caption(m, images[0])
        fns[f"{p} first"] = lambda m=m: _first_word(m, x)
        fns[f"{p} beam"] = lambda m=m: caption(m, x, strategy="beam", beam_size=3)
    st = measure_interleaved(fns, warmup=s.warmup, repeat=s.repeat)
    batch = measure_interleaved({p: (lambda m=m: caption_batch(m, pils, batch_size=32)) for p, m in models.items()},
                                warmup=1, repeat=1 if s.quick else 3)
    base = caption_batch(models["fp32"], pils)
    rows = []
    for p, m in models.items():
        caps = caption_batch(m, pils)
        rows.append({"precision": p, "runs": m.precision, "greedy_ms": round(st[f"{p} greedy"].median_ms, 1),
                     "first_word_ms": round(st[f"{p} first"].median_ms, 1), "beam3_ms": round(st[f"{p} beam"].median_ms, 1),
                     "batch32_ips": round(len(pils) / (batch[p].median_ms / 1e3), 1),
                     "same_captions": f"{sum(a == b for a, b in zip(base, caps))}/{len(base)}",
                     "words": len(caption(m, images[0]).split())})
    return {"rows": rows, "cpu": cpu_features(), "auto": inference_plan("auto"),
            "note": "greedy from the JPEG file (encoder included); first word and beam 3 from the image tensor; batch 32: "
                    "caption_batch over decoded images; same captions: greedy captions of the batch images equal to fp32's"}


def training(model, s: Settings) -> dict:
    """A teacher-forcing step (batch 128) and a self-critical step's forward parts (rollouts of 64 x 5 captions and
    their log-probabilities), in float32 and in bfloat16 autocast; weights and optimizer float32 both times."""
    from captioner.decode import generate_batch
    from captioner.generation import GenerationConfig

    torch.manual_seed(0)
    trainee = copy.deepcopy(model).float().train()
    trainee.encoder.set_trainable(False)
    with torch.inference_mode():
        shape = trainee.encoder.backbone_features(torch.zeros(1, 3, model.config.image_size, model.config.image_size)).shape[1:]
    features = torch.randn(BATCH, *shape)
    captions = torch.randint(4, model.config.vocab_size, (MAX_TOKENS, BATCH))
    captions[0] = model.vocab.sos_id
    params = [p for p in trainee.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def tf_step(precision):
        trainee.train()
        with autocast(precision):
            logits = trainee.forward_features(features, captions)  # (T, B, V)
        loss = caption_loss(logits.float(), captions, pad_id=model.vocab.pad_id, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()

    rollout_features = features[:64].repeat_interleave(5, dim=0)  # (320, ...): 64 images x 5 samples

    def rollouts(precision):
        trainee.eval()
        with torch.no_grad(), autocast(precision):
            generate_batch(trainee, trainee.encoder.from_backbone(rollout_features), GenerationConfig(
                strategy="sample", max_len=MAX_TOKENS - 2, top_k=5, top_p=1.0, no_repeat_ngram=0))

    st = measure_interleaved({"tf fp32": lambda: tf_step("fp32"), "tf bf16": lambda: tf_step("bf16"),
                              "roll fp32": lambda: rollouts("fp32"), "roll bf16": lambda: rollouts("bf16")},
                             warmup=1, repeat=s.train_steps)
    rows = []
    for p in ("fp32", "bf16"):
        rows.append({"stage": f"teacher-forcing step, batch {BATCH}, {MAX_TOKENS} tokens", "precision": p,
                     "per_s": round(BATCH / (st[f"tf {p}"].median_ms / 1e3), 1), "unit": "captions/s",
                     "median_ms": round(st[f"tf {p}"].median_ms, 1)})
    for p in ("fp32", "bf16"):
        rows.append({"stage": "self-critical rollouts, 64 images x 5 samples (top-5 sampling)", "precision": p,
                     "per_s": round(64 / (st[f"roll {p}"].median_ms / 1e3), 1), "unit": "images/s",
                     "median_ms": round(st[f"roll {p}"].median_ms, 1)})
    return {"rows": rows, "note": f"{s.train_steps} steps per variant after 1 warm-up, interleaved; random features and "
                                  "captions; bf16 = torch.autocast('cpu', torch.bfloat16), float32 weights and optimizer"}
