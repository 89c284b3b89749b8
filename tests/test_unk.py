"""Training and decoding agree about <UNK> and about where a caption ends (issue 15, section 1), on tiny models.

Decoding never emits <UNK>. A model taught <UNK> as a target learns to put its mass there after "in front of a";
decoding masks it, <EOS> wins among the rest, and the caption stops mid-phrase. These tests pin the three parts of
the fix: the loss never targets <UNK>, self-critical training's policy has no <UNK> either and its reward sees the
caption's end, and the last record says truthfully when <UNK> was what the model wanted.
"""
import json

import pytest
import torch

from captioner.decode import describe_stop, stream
from captioner.model import caption_loss
from captioner.vocab import CUT_OFF_ENDINGS, is_cut_off
from tiny import WORDS, tiny_model

UNK, EOS = WORDS.index("<UNK>"), WORDS.index("<EOS>")
A, DOG, RUNS = WORDS.index("a"), WORDS.index("dog"), WORDS.index("runs")


def test_caption_loss_never_targets_unk():
    m = tiny_model()
    caps = torch.tensor([[1, A, UNK, RUNS, 2], [1, A, DOG, RUNS, 2]]).T  # (T, B): "a <UNK> runs", "a dog runs"
    logits = m(torch.randn(2, 3, 32, 32), caps)
    loss = caption_loss(logits, caps, unk_id=UNK)
    garbage = logits.clone()
    garbage[2, 0] = torch.randn_like(garbage[2, 0]) * 100  # the <UNK> target's logits do not count
    assert torch.allclose(loss, caption_loss(garbage, caps, unk_id=UNK))
    assert not torch.allclose(caption_loss(logits, caps), caption_loss(garbage, caps))  # without unk_id they do
    keep = (caps != 0) & (caps != UNK)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[keep], caps[keep]))


def _fit(unk_id):
    """Teacher-force a tiny model on captions whose second word is a rare one (<UNK>) 4 times in 5 and "dog" once;
    return the model's probabilities for that word, before decoding masks anything."""
    m = tiny_model(seed=1).train()
    caps = torch.tensor([[1, A, UNK, RUNS, 2]] * 4 + [[1, A, DOG, RUNS, 2]]).T  # (T=5, B=5)
    images = torch.randn(1, 3, 32, 32).expand(5, -1, -1, -1)
    opt = torch.optim.Adam(m.parameters(), lr=3e-2)
    for _ in range(150):
        opt.zero_grad()
        caption_loss(m(images, caps), caps, unk_id=unk_id).backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        return torch.softmax(m(images[:1], caps[:, :1])[2, 0], -1)  # (V,): what follows "a"


def test_a_model_trained_without_unk_targets_gives_unk_no_mass():
    """Where the captions held a rare word, the model learns the known word instead of <UNK>; taught <UNK> (the old
    recipe, --learn-unk) it puts most of the mass on a token decoding never says."""
    fixed, old = _fit(unk_id=UNK), _fit(unk_id=None)
    assert fixed[UNK] < 0.02 and fixed.argmax() == DOG
    assert old[UNK] > 0.6


def _scst_objective(model, tmp_path):
    from train.config import TrainConfig
    from train.objectives import CaptionObjective

    refs = [["a dog runs .", "a dog runs"], ["a dog", "dog runs"], ["runs .", "a ."]]  # idf needs several images
    cfg = TrainConfig(out=str(tmp_path), scst_samples=4, scst_top_k=0)
    return CaptionObjective(model, torch.nn.Identity(), model.vocab, refs, cfg, device="cpu")


def test_self_critical_gradient_never_reaches_unk(tmp_path):
    """Rollouts never draw <UNK>, so the policy trained is the masked one: no gradient on <UNK>'s output row."""
    from types import SimpleNamespace

    m = tiny_model(seed=2)
    objective = _scst_objective(m, tmp_path)
    batch = SimpleNamespace(x=m.encoder.backbone_features(torch.randn(2, 3, 32, 32)), images=[0, 1], captions=None, flipped=None)
    loss, reward = objective(batch, self_critical=True)
    assert reward > 0
    loss.backward()
    grad = m.decoder.head.weight.grad
    assert grad[UNK].abs().max() == 0 and m.decoder.head.bias.grad[UNK] == 0
    assert grad[EOS].abs().max() > 0  # the words it can say do learn


def test_reward_counts_the_end_of_the_caption():
    """With the end as a word of the n-grams, ending where the references end earns reward and stopping after "on
    the" costs it; without, ending makes no difference."""
    from captioner import Vocabulary
    from train.objectives import CiderReward

    vocab = Vocabulary(["<PAD>", "<SOS>", "<EOS>", "<UNK>", "a", "dog", "runs", "on", "the", "grass", "cat"])
    refs = [["a dog runs on the grass", "a dog runs on the grass .", "the dog runs on grass"],
            ["a cat on the grass", "a cat"]]
    ids = lambda text: [vocab.stoi[w] for w in text.split()]  # noqa: E731

    def rewards(eos):
        reward = CiderReward(refs, vocab, eos=eos)
        rows = [ids("a dog runs on the grass") + [EOS], ids("a dog runs on the grass"),  # ended / cut by the length limit
                ids("a dog runs on the") + [EOS], ids("a dog runs on the")]
        return reward(rows, [0], samples=4)[0].tolist()

    done, long, cut, cut_long = rewards(eos=True)
    assert done > long  # "grass <eos>" is in the references
    assert cut < cut_long  # "the <eos>" is not: stopping mid-phrase is paid for
    plain = rewards(eos=False)
    assert plain[0] == pytest.approx(plain[1]) and plain[2] == pytest.approx(plain[3])


@pytest.mark.parametrize("strategy", ["greedy", "beam", "guided"])
def test_last_record_says_when_unk_was_what_the_model_wanted(strategy):
    """A model whose likeliest next token is <UNK> at every step: the caption ends where <EOS> is the best of the
    rest, and the last record says "unk" with the probability, not that the model ended it."""
    m = tiny_model(seed=3)
    with torch.no_grad():
        m.decoder.head.bias[UNK] += 30.0
    last = list(stream(m, torch.randn(3, 32, 32), strategy=strategy, max_len=20))[-1]
    assert last.stop == "unk" and last.stop_unk_prob > 0.99
    assert all(s.unk_prob > 0.99 for s in last.caption_steps())
    assert "outside its vocabulary" in describe_stop(last) and "100%" in describe_stop(last)
    with torch.no_grad():
        m.decoder.head.bias[UNK] -= 60.0  # <UNK> never likely: the same caption's end is the model's own
    last = list(stream(m, torch.randn(3, 32, 32), strategy=strategy, max_len=20))[-1]
    assert last.stop in ("eos", "max_len") and all(s.unk_prob < 1e-6 for s in last.caption_steps())
    assert last.stop != "eos" or last.stop_unk_prob < 1e-6


def test_cli_json_reports_the_stop_and_unk_probabilities(tmp_path, capsys):
    from PIL import Image

    from captioner.cli import main

    m = tiny_model(seed=3)
    with torch.no_grad():
        m.decoder.head.bias[UNK] += 30.0
    m.save_pretrained(tmp_path / "model")
    Image.new("RGB", (40, 30), (200, 120, 40)).save(tmp_path / "x.png")
    assert main([str(tmp_path / "x.png"), "--model", str(tmp_path / "model"), "--json", "--steps"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["stop"] == "unk" and rec["stop_unk_prob"] > 0.99
    assert all(s["unk_prob"] > 0.99 for s in rec["steps"])


def test_cut_off_endings():
    assert is_cut_off("A man is standing in front of a.") and is_cut_off("two dogs play with their")
    assert not is_cut_off("A dog runs on the grass.") and not is_cut_off("")
    assert {"a", "of", "in", "the", "its"} <= CUT_OFF_ENDINGS


def test_evaluation_counts_cut_off_captions():
    from train.evaluate import format_table, score

    refs = [["a dog runs on the grass"], ["a man stands in front of a building"]]
    m = score(["A dog runs on the grass.", "A man stands in front of a."], refs)
    assert m["cut_off"] == 1 and "| cut off |" in format_table({"greedy": m}).splitlines()[0]
