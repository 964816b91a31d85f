"""What `apply` refuses for the loaded model is said before a command generates anything."""

import functools

import pytest

from diffsparse import compare, evaluate
from diffsparse.cli import main


@pytest.mark.parametrize("argv", [
    # Before, eval generated the warm-ups, every dense video and the earlier configurations' videos first, then
    # ended at the refused configuration's turn with nothing written; bench pipeline after its dense run.
    ["eval", "--pattern", "radial", "--density", "none", "--dense-steps", "0", "--dense-layers", "0,[99]",
     "--prompts", "1"],
    ["bench", "pipeline", "--dense-layers", "[99]", "--repeats", "1"],
    ["trace", "--dense-layers", "[99]"],
])
def test_a_block_the_model_lacks_is_refused_before_any_generation(argv, tmp_path, capsys, monkeypatch):
    load = compare.load_pipeline_for

    def load_without_generating(args):
        pipe = load(args)

        @functools.wraps(type(pipe).__call__)  # the commands read the call's parameters (num_frames, image)
        def generate(*args, **kwargs):
            raise AssertionError("generated before refusing dense_layers")

        monkeypatch.setattr(type(pipe), "__call__", generate)
        return pipe

    # eval holds its own reference (imported at the top of evaluate.py; imported here first, so it is the real
    # loader's and a patch of compare's alone neither reaches eval nor stays behind in it).
    for module in (compare, evaluate):
        monkeypatch.setattr(module, "load_pipeline_for", load_without_generating)
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--steps", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "SparseConfig.dense_layers=[99]: no transformer has block 99" in err, err
