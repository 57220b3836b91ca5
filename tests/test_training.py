"""`fusedlm train` and `fusedlm generate` end to end on a tiny byte-level model (the fused CPU kernels)."""
import re

import pytest
import torch

from fusedlm.cli import main

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "32", "--batch", "8"]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return path


def test_train_lowers_the_loss_and_generate_continues_the_prompt(text_file, tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    assert main(["train", "--data", str(text_file), "--out", str(ckpt), "--steps", "60", "--eval-every", "20",
                 "--lr", "3e-3", "--warmup", "5", *TINY]) == 0
    out = capsys.readouterr().out
    steps = [(int(s), float(loss), float(val)) for s, loss, val in
             re.findall(r"step +(\d+) +loss ([\d.]+) +val ([\d.]+)", out)]
    assert [s for s, _, _ in steps] == [0, 20, 40, 59]
    # byte-level cross-entropy starts near ln(320) = 5.8; a repeated sentence is learned fast
    assert steps[0][2] > 5.0 and steps[-1][2] < 2.5, out
    saved = torch.load(ckpt, weights_only=True)
    assert saved["tokens"] == "bytes" and saved["config"]["n_layer"] == 1 and saved["step"] == 60

    runs = []
    for _ in range(2):
        assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "the quick", "--max-new-tokens", "20",
                     "--seed", "3"]) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] and runs[0].startswith("the quick")  # seeded: the same continuation
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "the quick brown", "--max-new-tokens", "40",
                 "--temperature", "0"]) == 0  # greedy, past block_size: the context is cropped
    assert capsys.readouterr().out.startswith("the quick brown")


def test_train_and_generate_refuse_bad_inputs(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(SystemExit, match="too few for --seq-len 32"):
        main(["train", "--data", str(short), "--out", str(tmp_path / "x.pt"), *TINY])
    for saved in ({"weights": torch.zeros(2)}, [1, 2]):
        other = tmp_path / "other.pt"
        torch.save(saved, other)
        with pytest.raises(SystemExit, match="is no `fusedlm train` checkpoint"):
            main(["generate", "--checkpoint", str(other), "--prompt", "a"])
    with pytest.raises(SystemExit, match="--checkpoint .*missing.pt: no such file"):
        main(["generate", "--checkpoint", str(tmp_path / "missing.pt"), "--prompt", "a"])
    with pytest.raises(SystemExit, match="--data .*missing.txt: no such file"):
        main(["train", "--data", str(tmp_path / "missing.txt")])
    for option, value, message in (("--steps", "0", "--steps must be > 0"), ("--batch", "0", "--batch must be > 0"),
                                   ("--eval-every", "0", "--eval-every must be > 0"),
                                   ("--n-head", "3", "--n-embd 32 must be a multiple of --n-head 3")):
        with pytest.raises(SystemExit, match=message):
            main(["train", "--out", str(tmp_path / "x.pt"), *TINY, option, value])
    with pytest.raises(SystemExit, match="--max-new-tokens must be >= 0"):
        main(["generate", "--checkpoint", str(other), "--prompt", "a", "--max-new-tokens", "-1"])
