"""The testbed pipeline's and its helpers' input checks, and where `sample` leaves a pipeline (fast: no sampling
beyond one step at 16 x 16 pixels)."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

from diffsparse.pipelines import testbed  # module access: pytest would collect `Test*` names imported here
from diffsparse.testbed import evidence, fidelity

CALL = {"num_frames": 1, "height": 16, "width": 16, "num_inference_steps": 1}
TWO = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def pipe():
    return testbed.build_pipeline()


@pytest.mark.parametrize(
    "rows, per_prompt",
    # 3 rows failed inside the model with a size mismatch, as did 1 row with two videos per prompt; 1 row with one
    # video per prompt ran, the one negative broadcast to both prompts without a word.
    [(3, 1), (1, 2), (1, 1)],
)
def test_negative_prompt_embeds_need_one_row_per_prompt(pipe, rows, per_prompt):
    embeds = pipe.encode_prompt(TWO)
    with pytest.raises(ValueError, match=re.escape("negative_prompt_embeds must be a (prompts, tokens, channels) "
                                                   "tensor with one row per prompt (2)")):
        pipe(prompt=TWO, negative_prompt_embeds=embeds[:1].repeat(rows, 1, 1), num_videos_per_prompt=per_prompt,
             **CALL)
    pipe(prompt=TWO, negative_prompt_embeds=embeds, num_videos_per_prompt=2, **CALL)  # one per prompt runs


@pytest.mark.parametrize(
    "name, value, got",
    # An IndexError deep in the model (2-D), an AttributeError (a list), a matmul RuntimeError (another width, the
    # negative's too), integer token ids read as embeddings.
    [("prompt_embeds", torch.randn(2, 64), "a torch.float32 tensor of shape (2, 64)"),
     ("prompt_embeds", [[0.0] * 64] * 2, "a list"),
     ("prompt_embeds", torch.randn(2, 16, 32), "a torch.float32 tensor of shape (2, 16, 32)"),
     ("prompt_embeds", torch.ones(2, 16, 64, dtype=torch.long), "a torch.int64 tensor of shape (2, 16, 64)"),
     ("negative_prompt_embeds", torch.randn(2, 16, 32), "a torch.float32 tensor of shape (2, 16, 32)")],
)
def test_prompt_embeds_are_checked(pipe, name, value, got):
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    given = {"prompt": TWO} if name == "negative_prompt_embeds" else {}
    try:
        with pytest.raises(ValueError, match=re.escape(
                f"{name} must be a floating tensor of shape (prompts, tokens, 64) (the transformer's text_dim), as "
                f"encode_prompt gives, got {name}={got}")):
            pipe(**given, **{name: value}, **CALL)
    finally:
        handle.remove()
    assert calls == [] and pipe.transformer.config.text_dim == 64


@pytest.mark.parametrize(
    "kwargs, match",
    [  # TypeErrors from inside the tokenizer or len(), or (nan) a silent run without CFG
        ({"prompt": [None]}, "prompt must be a str or a list of str, got prompt=[None]"),
        ({"prompt": ["a", 3]}, "prompt must be a str or a list of str, got prompt=['a', 3]"),
        ({"prompt": 5}, "prompt must be a str or a list of str, got prompt=5"),
        ({"prompt": "a", "negative_prompt": 5},
         "negative_prompt must be a str or a list of str, got negative_prompt=5"),
        ({"prompt": "a", "guidance_scale": float("nan")}, "guidance_scale must be a finite real number"),
        ({"prompt": "a", "guidance_scale": "3"}, "guidance_scale must be a finite real number"),
    ],
)
def test_prompt_and_guidance_scale_of_the_wrong_type_are_named(pipe, kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        pipe(**CALL, **kwargs)


def test_a_one_element_tensor_or_numpy_guidance_scale_is_a_number(pipe):
    # As diffusers' pipelines take them (a 0-d tensor was refused for a while after the type check came).
    def frames(scale):
        return pipe(**CALL, prompt="a", guidance_scale=scale, generator=torch.Generator().manual_seed(0)).frames

    reference = frames(2.0)
    for scale in (torch.tensor(2.0), torch.tensor([2.0]), np.float32(2.0)):
        assert np.array_equal(frames(scale), reference)
    with pytest.raises(ValueError, match="guidance_scale must be a finite real number"):
        pipe(**CALL, prompt="a", guidance_scale=torch.tensor(float("nan")))


@pytest.mark.parametrize("output_type", ["numpy", "PIL", None])
def test_an_unknown_output_type_is_refused_before_the_transformer_runs(pipe, output_type):
    # Before: diffusers refused it only when post-processing, after the whole denoising loop.
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=re.escape(f"output_type must be one of ('np', 'pt', 'pil', 'latent'), "
                                                       f"got output_type={output_type!r}")):
            pipe(prompt="a red circle", output_type=output_type, **CALL)
    finally:
        handle.remove()
    assert calls == []


def test_every_output_type_the_check_allows_runs(pipe):
    def frames(output_type):
        generator = torch.Generator().manual_seed(0)
        return pipe(prompt="a red circle", output_type=output_type, generator=generator, **CALL).frames

    video = frames("pt")
    assert video.shape == (1, 1, 3, 16, 16)
    np.testing.assert_allclose(frames("np"), video.permute(0, 1, 3, 4, 2).numpy(), atol=1e-6)
    assert [image.size for image in frames("pil")[0]] == [(16, 16)]
    assert frames("latent").shape == (1, pipe.transformer.config.in_channels, 1, 8, 8)


def test_numpy_integer_counts_are_ints(pipe, monkeypatch):
    # As WanPipeline takes them; before, np.int64(2) was refused as "must be an int". What the pipeline hands on
    # (to the scheduler here) is a plain int, as from any other caller.
    steps = []
    set_timesteps = pipe.scheduler.set_timesteps
    monkeypatch.setattr(pipe.scheduler, "set_timesteps",
                        lambda n, **kwargs: steps.append(n) or set_timesteps(n, **kwargs))

    def frames(**counts):
        generator = torch.Generator().manual_seed(0)
        return pipe(prompt="a red circle", generator=generator, output_type="pt", **{**CALL, **counts}).frames

    reference = frames(num_frames=2, num_inference_steps=2, max_sequence_length=8)
    as_numpy = frames(num_frames=np.int64(2), num_inference_steps=np.int32(2), height=np.int64(16),
                      width=np.int16(16), num_videos_per_prompt=np.int64(1), max_sequence_length=np.int64(8))
    assert torch.equal(as_numpy, reference) and [type(n) for n in steps] == [int, int]
    for name, value in (("num_frames", True), ("num_frames", np.float64(2.0)), ("num_inference_steps", np.int64(0))):
        with pytest.raises(ValueError, match=re.escape(f"{name} must be an int >= 1, got {name}={value!r}")):
            frames(**{name: value})


def test_load_names_a_device_it_cannot_use_before_reading_weights(monkeypatch):
    # Before: every weight was read, then `.to` failed with torch's RuntimeError.
    def never(*args, **kwargs):
        raise AssertionError("weights were read before the device was checked")

    monkeypatch.setattr(testbed.TestbedPipeline, "from_pretrained", never)
    with pytest.raises(ValueError, match=re.escape("device='gpu': not a torch device")):
        testbed.load(device="gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=re.escape("device='cuda': this machine has no cuda device")):
        testbed.load(device="cuda")
    # A machine with two GPUs: indices 0 and 1 pass the check (and reach the loading), 2 does not.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=re.escape("device='cuda:2': this machine has 2 cuda device(s)")):
        testbed.load(device="cuda:2")
    with pytest.raises(AssertionError, match="weights were read"):
        testbed.load(device="cuda:1")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_load_refuses_a_float8_dtype(dtype):
    # Floating, so it passed the check, then failed inside from_pretrained: "couldn't find storage object
    # Float8_e4m3fnStorage".
    with pytest.raises(ValueError, match=re.escape(
            f"dtype must be one of torch.float32, torch.float64, torch.float16, torch.bfloat16, "
            f"got dtype={dtype!r}")):
        testbed.load(dtype=dtype)


def test_a_prompt_of_symbols_alone_is_said_to_be_read_as_the_empty_prompt(pipe, caplog):
    # Before, "…" or "🔴" cleaned to "" and sampled unconditionally without a word.
    with caplog.at_level("WARNING", logger=testbed.__name__):
        pipe.encode_prompt(["…", "🔴 ❤️", "", "  ", "a red circle"])
    notes = [record.getMessage() for record in caplog.records]
    assert [note.split(" holds")[0] for note in notes] == ["The prompt '…'", "The prompt '🔴 ❤️'"]  # not the blank
    assert all("holds no word (letters or digits; punctuation, symbols and emoji are dropped): it is read as the "
               "empty, unconditional prompt" in note for note in notes)


def test_load_refuses_weights_that_are_not_finite(tmp_path):
    # Before: NaN weights loaded silently and sampled NaN video.
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "copy"
    shutil.copytree(testbed.WEIGHTS_PATH, folder)
    file = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights = load_file(file)
    weights["scale_shift_table"] = torch.full_like(weights["scale_shift_table"], float("nan"))
    save_file(weights, file, metadata={"format": "pt"})
    named = re.escape("must hold finite weights, got NaN or inf in ['scale_shift_table']")
    with pytest.raises(ValueError, match=named):
        testbed.load(path=folder)


@pytest.mark.parametrize("part, file", [("transformer", "diffusion_pytorch_model.safetensors"),
                                        ("text_encoder", "model.safetensors")])
def test_load_names_a_missing_weight_or_weight_file(tmp_path, part, file):
    # Before: a missing weight file was diffusers' OSError about a `.bin` it looked for instead.
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "copy"
    shutil.copytree(testbed.WEIGHTS_PATH, folder)
    weights = load_file(folder / part / file)
    dropped = min(weights)
    save_file({k: v for k, v in weights.items() if k != dropped}, folder / part / file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(f"at its shape and nothing else: missing ['{dropped}']")):
        testbed.load(path=folder)
    (folder / part / file).unlink()
    with pytest.raises(ValueError, match=re.escape(f"{folder / part} (path={str(folder)!r}) must hold the {part}'s "
                                                   "weights as save_pretrained writes them (")
                       + ".*" + re.escape(f"{file}") + ".*" + re.escape("), got no weight file")):
        testbed.load(path=folder)


def test_load_checks_weights_saved_without_safetensors_too(tmp_path):
    # `save_pretrained(safe_serialization=False)` writes `.bin`: a missing weight then failed inside diffusers
    # ("Cannot copy out of meta tensor") and a NaN one loaded silently.
    folder = tmp_path / "bin"
    testbed.load().save_pretrained(folder, safe_serialization=False)
    (file,) = folder.glob("transformer/*.bin")
    weights = torch.load(file, weights_only=True)
    dropped = min(weights)
    torch.save({k: v for k, v in weights.items() if k != dropped}, file)
    with pytest.raises(ValueError, match=re.escape(f"at its shape and nothing else: missing ['{dropped}']")):
        testbed.load(path=folder)
    torch.save({**weights, dropped: torch.full_like(weights[dropped], float("nan"))}, file)
    with pytest.raises(ValueError, match=re.escape(f"must hold finite weights, got NaN or inf in ['{dropped}']")):
        testbed.load(path=folder)
    torch.save(weights, file)
    assert testbed.load(path=folder).transformer.config.num_layers == 4
    torch.save(weights, file, _use_new_zipfile_serialization=False)  # torch < 1.6's format, which mmap refuses
    assert testbed.load(path=folder).transformer.config.num_layers == 4


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The shipped weights saved as save_pretrained shards them: an index json and its shards, both parts."""
    folder = tmp_path_factory.mktemp("sharded") / "pipeline"
    testbed.load().save_pretrained(folder, max_shard_size="200KB")
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (folder / "text_encoder" / "model.safetensors.index.json").is_file()
    return folder


def _first_file(folder, part):
    from safetensors.torch import load_file

    shipped = load_file(next((testbed.WEIGHTS_PATH / part).glob("*.safetensors")))
    return shipped, min(shipped)


def test_load_checks_the_shards_an_index_names_not_a_consolidated_file_beside_them(sharded, tmp_path):
    # diffusers reads an index's shards before the single file, so a consolidated file left beside them is not
    # loaded. Before, its keys were merged into the checked ones: one extra key refused a good folder, and a
    # complete one hid a shard's missing weight (diffusers then failed with an error about meta tensors).
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "copy"
    shutil.copytree(sharded, folder)
    part = folder / "transformer"
    shipped, dropped = _first_file(folder, "transformer")
    save_file({**shipped, "stale.weight": torch.zeros(2)}, part / "diffusion_pytorch_model.safetensors",
              metadata={"format": "pt"})
    loaded = testbed.load(path=folder)
    assert torch.equal(loaded.transformer.state_dict()[dropped], shipped[dropped])
    save_file(shipped, part / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    index = json.loads((part / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = part / index["weight_map"][dropped]
    save_file({k: v for k, v in load_file(shard).items() if k != dropped}, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(f"at its shape and nothing else: missing ['{dropped}']")):
        testbed.load(path=folder)
    shard.unlink()
    with pytest.raises(ValueError, match=re.escape("must name the shards beside it in its weight_map, got missing "
                                                   f"shard files ['{shard.name}']")):
        testbed.load(path=folder)


@pytest.mark.parametrize("part, index_name", [
    ("transformer", "diffusion_pytorch_model.safetensors.index.json"),
    ("text_encoder", "model.safetensors.index.json"),
])
@pytest.mark.parametrize("damage", ["metadata", "weight_map", "metadata null", "weight_map list", "shard number",
                                    "a list", "not json", "not utf-8"])
def test_load_refuses_a_shard_index_from_pretrained_cannot_read(sharded, tmp_path, part, index_name, damage):
    # diffusers and transformers index `metadata` and `weight_map` unguarded, and write into `metadata`. Before, an
    # index without `metadata` (or with null) passed the check (its shards were complete) and loading then failed
    # with a bare KeyError: 'metadata' (TypeError), and a damaged weight_map with an AttributeError of the check's.
    folder = tmp_path / "copy"
    shutil.copytree(sharded, folder)
    index_file = folder / part / index_name
    if part == "text_encoder":
        (folder / part / "model.safetensors").unlink(missing_ok=True)
    index = json.loads(index_file.read_text())
    first = next(iter(index["weight_map"]))
    damaged, expected = {
        "metadata": ({k: v for k, v in index.items() if k != "metadata"}, "got no 'metadata'"),
        "weight_map": ({k: v for k, v in index.items() if k != "weight_map"}, "got no 'weight_map'"),
        "metadata null": ({**index, "metadata": None}, "got metadata=None"),
        "weight_map list": ({**index, "weight_map": list(index["weight_map"])}, "got weight_map=["),
        "shard number": ({**index, "weight_map": {**index["weight_map"], first: 1}},
                         "must map each weight to a shard file name in its weight_map, got ['1']"),
        "a list": ([index], "with 'metadata' and 'weight_map', as save_pretrained writes it, got a list"),
        "not json": (None, "must be the JSON save_pretrained writes"),
        "not utf-8": (None, "must be the JSON save_pretrained writes"),
    }[damage]
    if damage == "not json":
        index_file.write_text(index_file.read_text()[:-2])
    elif damage == "not utf-8":
        index_file.write_bytes(b"\xff\xfe{}")
    else:
        index_file.write_text(json.dumps(damaged))
    with pytest.raises(ValueError, match=re.escape(f"{index_file} (")) as raised:
        testbed.load(path=folder)
    assert expected in str(raised.value)


def test_load_checks_the_text_encoders_single_file_before_its_shards(sharded, tmp_path):
    # transformers reads `model.safetensors` before an index: shards left beside it are not loaded, and before, they
    # filled its gaps in the check while the model loaded fresh random weights there.
    from safetensors.torch import save_file

    folder = tmp_path / "copy"
    shutil.copytree(sharded, folder)
    shipped, dropped = _first_file(folder, "text_encoder")
    save_file({k: v for k, v in shipped.items() if k != dropped}, folder / "text_encoder" / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(f"at its shape and nothing else: missing ['{dropped}']")):
        testbed.load(path=folder)


@pytest.mark.parametrize("part, file, variant", [
    ("transformer", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"),
    ("text_encoder", "model.safetensors", "model.fp16.safetensors"),
])
def test_load_checks_the_weights_it_loads_not_a_variant_beside_them(tmp_path, part, file, variant):
    # `load` asks for no variant, so from_pretrained reads the main file only. Before, a complete `.fp16` variant
    # filled the main file's gaps in the check, and the text encoder then loaded a random weight in the gap.
    from safetensors.torch import save_file

    folder = tmp_path / "copy"
    shutil.copytree(testbed.WEIGHTS_PATH, folder)
    shipped, dropped = _first_file(folder, part)
    save_file({k: v.half() for k, v in shipped.items()}, folder / part / variant, metadata={"format": "pt"})
    assert testbed.load(path=folder).components[part].state_dict()[dropped].dtype == torch.float32
    save_file({k: v for k, v in shipped.items() if k != dropped}, folder / part / file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(f"at its shape and nothing else: missing ['{dropped}']")):
        testbed.load(path=folder)
    (folder / part / file).unlink()
    with pytest.raises(ValueError, match=re.escape(f"got only ['{variant}'], which from_pretrained does not read")):
        testbed.load(path=folder)


def test_load_refuses_a_transformers_weights_file_that_transformers_would_not_read(tmp_path):
    # transformers reads the file a config's `transformers_weights` names and nothing else: before, a missing one
    # was passed over for model.safetensors in the check, and from_pretrained then failed on the missing file.
    folder = tmp_path / "copy"
    shutil.copytree(testbed.WEIGHTS_PATH, folder)
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    for named, said in (("nope.safetensors", "and there is no such file"), ("model.bin", "must be a .safetensors")):
        config_path.write_text(json.dumps({**config, "transformers_weights": named}))
        with pytest.raises(ValueError, match=re.escape(f"names transformers_weights={named!r}") + ".*" + said):
            testbed.load(path=folder)
    config_path.write_text(json.dumps({**config, "transformers_weights": "model.safetensors"}))
    assert testbed.load(path=folder).text_encoder is not None


def test_load_says_that_bin_shards_need_saving_again(tmp_path):
    # diffusers reads .bin shards only with use_safetensors=False: before, the message said the folder was not as
    # save_pretrained writes it (it is) and spoke of variants.
    folder = tmp_path / "bin"
    testbed.load().save_pretrained(folder, safe_serialization=False, max_shard_size="200KB")
    assert (folder / "transformer" / "diffusion_pytorch_model.bin.index.json").is_file()
    with pytest.raises(ValueError, match=re.escape("holds the transformer's weights as .bin shards") + ".*"
                       + re.escape("save them again with safe_serialization=True")):
        testbed.load(path=folder)


def test_prompt_sensitivity_needs_two_frames_to_set_the_first_apart(capsys):
    # Before: one frame given clean left nothing scored, and every sensitivity came out nan (0 / 0).
    with pytest.raises(ValueError, match=re.escape("it needs frames >= 2, got frames=1 with first_frame_level=0.0")):
        fidelity.prompt_sensitivity(testbed.build_pipeline(), 1, 16, 16, seeds=1, noise_levels=(0.5,),
                                    first_frame_level=0.0)
    with pytest.raises(SystemExit):
        fidelity.main(["--size", "1x16x16", "--first-frame-level", "0", "--sensitivity-only"])
    assert "--first-frame-level sets the first frame apart" in capsys.readouterr().err


@pytest.mark.parametrize(
    "size, match",
    # A RuntimeError from inside (off the 4-pixel token grid), or frames read as a count (True, 0).
    [((2, 18, 18), "height must be a positive multiple of 4 pixels, got height=18"),
     ((2, 16, 18), "width must be a positive multiple of 4 pixels, got width=18"),
     ((0, 16, 16), "frames must be an int >= 1, got frames=0"),
     ((True, 16, 16), "frames must be an int >= 1, got frames=True")],
)
def test_prompt_sensitivity_checks_the_clip_size_as_the_pipeline_does(pipe, size, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        fidelity.prompt_sensitivity(pipe, *size, seeds=1, noise_levels=(0.5,))


def test_room_ahead_takes_one_still_image():
    # A batch (1, 3, H, W) failed with "too many values to unpack"; (H, W) was measured as if its rows were colours.
    for image, got in ((torch.zeros(1, 3, 16, 16), "shape (1, 3, 16, 16)"), (torch.zeros(16, 16), "shape (16, 16)"),
                       (np.zeros((3, 16, 16)), "a ndarray")):
        with pytest.raises(ValueError, match=re.escape(f"image must be one still, a tensor of shape (3, H, W) in "
                                                       f"[0, 1], got image={got}")):
            testbed.room_ahead(image, "a red circle moving left")


# ---------------------------------------------------------------- where `sample` leaves the pipeline


class _Recorder:
    """Stands in for the pipeline's `.to` and its call: records them, samples nothing."""

    def __init__(self, monkeypatch, pipe):
        self.moves, self.calls = [], []
        monkeypatch.setattr(pipe, "to", lambda *args, **kwargs: self.moves.append(args) or pipe)

        def call(pipeline, prompt, num_frames, height, width, **kwargs):
            self.calls.append(prompt)
            return testbed.TestbedPipelineOutput(frames=torch.rand(len(prompt), num_frames, 3, height, width))

        monkeypatch.setattr(testbed.TestbedPipeline, "__call__", call)


def _offload(pipe, kind: str) -> None:
    """The hooks diffusers' `enable_model_cpu_offload` / `enable_sequential_cpu_offload` leave, executing on a GPU
    this machine need not have (set, not initialised: initialising moves tensors to it)."""
    from accelerate.hooks import AlignDevicesHook, CpuOffload

    for part in ("text_encoder", "transformer"):
        hook = (CpuOffload(execution_device=torch.device("cuda")) if kind == "model"
                else AlignDevicesHook(execution_device=torch.device("cuda"), offload=True))
        getattr(pipe, part)._hf_hook = hook


@pytest.mark.parametrize("kind", ["model", "sequential"])
def test_an_offloaded_pipeline_is_left_to_its_hooks(monkeypatch, kind):
    # Before: `sample` moved it with `.to("cuda")`: diffusers refused a sequentially offloaded pipeline (so
    # `compare --two-stage --offload sequential` failed at the still) and undid model offloading.
    pipe = testbed.build_pipeline()
    _offload(pipe, kind)
    recorder = _Recorder(monkeypatch, pipe)
    still = testbed.best_still(pipe, ["a red circle moving left"], 16, 16, steps=1, device="cuda")
    assert still.shape == (1, 3, 16, 16) and recorder.calls == [["a red circle"]]
    testbed.sample(pipe, "a red circle moving left", frames=2, height=16, width=16, steps=1, device="cuda:0")
    assert recorder.moves == []
    with pytest.raises(ValueError, match=re.escape("device='cpu': the pipeline is offloaded by accelerate hooks "
                                                   "that run it on cuda")):
        testbed.sample(pipe, "a red circle", frames=1, height=16, width=16, steps=1, device="cpu")


def test_sample_without_a_device_leaves_the_pipeline_where_it_is(monkeypatch):
    # Before: the default device="cpu" moved a caller's pipeline off its GPU.
    pipe = testbed.build_pipeline()
    recorder = _Recorder(monkeypatch, pipe)
    testbed.sample(pipe, "a red circle", frames=1, height=16, width=16, steps=1)
    testbed.best_still(pipe, "a red circle moving left", 16, 16, steps=1)
    assert recorder.moves == [] and len(recorder.calls) == 2
    testbed.sample(pipe, "a red circle", frames=1, height=16, width=16, steps=1, device="cpu")
    assert recorder.moves == [(torch.device("cpu"),)]
    with pytest.raises(ValueError, match=re.escape("device='gpu': not a torch device")):
        testbed.sample(pipe, "a red circle", frames=1, height=16, width=16, steps=1, device="gpu")


def test_still_candidates_must_be_a_count_not_a_bool(monkeypatch):
    # Before, True was taken as 1 (bool is an int), where every other count of the module refuses it.
    pipe = testbed.build_pipeline()
    _Recorder(monkeypatch, pipe)
    call = {"height": 16, "width": 16, "steps": 1}
    for bad in (True, 0, 2.0):
        match = re.escape(f"still_candidates must be an int >= 1, got {bad!r}")
        with pytest.raises(ValueError, match=match):
            testbed.best_still(pipe, "a red circle moving left", still_candidates=bad, **call)
        with pytest.raises(ValueError, match=match):
            testbed.sample(pipe, "a red circle moving left", frames=2, two_stage=True, still_candidates=bad, **call)
    # numpy integers count, as for the pipeline's own counts.
    assert testbed.best_still(pipe, "a red circle moving left", still_candidates=np.int64(2), **call).shape == (
        1, 3, 16, 16)


class _Loaded(Exception):
    """Raised in place of loading the model: the command line got through its checks."""


def _no_loading(**kwargs):
    raise _Loaded


@pytest.mark.parametrize(
    "mode, given",
    [("--sensitivity-only", given) for given in (["--two-stage"], ["--still-candidates", "1"], ["--steps", "20"],
                                                 ["--guidance-scale", "9"], ["--first-frame"])]
    + [("--steering-only", given) for given in (["--two-stage"], ["--still-candidates", "1"], ["--first-frame"],
                                                ["--noise-levels", "0.2"], ["--first-frame-level", "0"])],
)
def test_a_check_run_alone_refuses_the_options_it_does_not_read(monkeypatch, capsys, mode, given):
    # Before, they were ignored without a word (even at their default value, a given option is refused).
    monkeypatch.setattr(testbed, "load", _no_loading)
    with pytest.raises(SystemExit):
        fidelity.main([mode, "--size", "2x16x16", *given])
    assert f"{mode} does not use {given[0]}: leave it out, or run without {mode}" in capsys.readouterr().err


def test_a_check_run_alone_takes_the_options_it_reads(monkeypatch):
    monkeypatch.setattr(testbed, "load", _no_loading)
    for argv in (["--sensitivity-only", "--seeds", "1", "--noise-levels", "0.5", "--first-frame-level", "0"],
                 ["--steering-only", "--seeds", "1", "--steps", "2", "--guidance-scale", "4"]):
        with pytest.raises(_Loaded):
            fidelity.main([*argv, "--size", "2x16x16"])


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_evidence_refuses_a_seed_out_of_range_before_sampling(capsys, seed):
    # Before, -1 failed in the attention decay, after samples.png had been overwritten.
    with pytest.raises(SystemExit):
        evidence.parse_args(["--seed", str(seed)])
    assert f"--seed must be in [0, 2**32), got {seed}" in capsys.readouterr().err
    assert evidence.parse_args(["--seed", str(2**32 - 1)]).seed == 2**32 - 1


def test_evidence_refuses_a_loss_log_of_no_step_before_sampling(tmp_path, capsys):
    # A run that failed in its first step leaves loss.csv with its header only: before, parse_args took it and
    # compact_loss_log refused it after the grid and the fidelity were sampled, samples.png already overwritten.
    run = tmp_path / "run"
    run.mkdir()
    (run / "loss.csv").write_text("step,loss,train_seconds\n")
    with pytest.raises(SystemExit):
        evidence.parse_args(["--run", str(run)])
    assert f"--run must be a training run folder (with loss.csv logging a step), got {str(run)!r} (its loss.csv " \
           "has no rows)" in capsys.readouterr().err
    (run / "loss.csv").write_text("step,loss,train_seconds\n1,0.5,1.0\n")
    base = tmp_path / "base.csv"
    base.write_text("step,loss,train_minutes,stage\n")
    with pytest.raises(SystemExit):
        evidence.parse_args(["--run", str(run), "--fine-tune-of", str(base)])
    assert f"--fine-tune-of must be a compact loss log file (loss.csv written here: step, loss, train_minutes) with " \
           f"rows, got {str(base)!r} (no rows)" in capsys.readouterr().err
    base.write_text("step,loss,train_minutes,stage\n25,0.4,1.0,0\n")
    assert evidence.parse_args(["--run", str(run), "--fine-tune-of", str(base)]).fine_tune_of == base


@pytest.mark.parametrize("case", ["raw log as --fine-tune-of", "compact log as --run", "not UTF-8",
                                  "not UTF-8 far down", "last row cut short"])
def test_evidence_refuses_a_loss_log_it_cannot_read_before_sampling(tmp_path, capsys, case):
    # Before, a log with rows passed parse_args whatever its columns: the earlier run's own loss.csv given as
    # --fine-tune-of failed on train_minutes (a KeyError) after the grid and the fidelity were sampled.
    run, base = tmp_path / "run", tmp_path / "base.csv"
    run.mkdir()
    (run / "loss.csv").write_text("step,loss,train_seconds\n1,0.5,1.0\n")
    base.write_text("step,loss,train_minutes,stage\n25,0.4,1.0,0\n")
    if case == "raw log as --fine-tune-of":
        base.write_text("step,loss,lr,train_seconds\n1,0.5,0.001,1.0\n")
        said = f"got {str(base)!r} (no column train_minutes (it has step, loss, lr, train_seconds))"
    elif case == "compact log as --run":
        (run / "loss.csv").write_text("step,loss,train_minutes,stage\n25,0.4,1.0,0\n")
        said = f"got {str(run)!r} (its loss.csv has no column train_seconds"
    elif case == "not UTF-8":
        base.write_bytes(b"step,loss,train_minutes,stage\n25,0.4,1.0,\xff\n")
        said = f"got {str(base)!r} (not UTF-8 text"
    else:  # past the first row and the first chunk read: before, only those were read here
        rows = "".join(f"{step},0.5,{step}.0\n" for step in range(1, 3000))
        if case == "not UTF-8 far down":
            (run / "loss.csv").write_bytes(f"step,loss,train_seconds\n{rows}".encode() + b"3000,0.5\xff,1.0\n")
            said = f"got {str(run)!r} (its loss.csv has not UTF-8 text"
        else:
            (run / "loss.csv").write_text(f"step,loss,train_seconds\n{rows}3000,0.5")
            said = f"got {str(run)!r} (its loss.csv has train_seconds=None on line 3001, not a number)"
    with pytest.raises(SystemExit):
        evidence.parse_args(["--run", str(run), "--fine-tune-of", str(base)])
    assert said in capsys.readouterr().err


def test_device_here_names_an_accelerator_index_past_the_count_and_a_device_torch_cannot_read(monkeypatch):
    from diffsparse import devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices.device_here("cuda:0") == torch.device("cuda:0")
    expected = "device='cuda:1': this machine has 1 cuda device(s), indices 0 to 0"
    with pytest.raises(ValueError, match=re.escape(expected)):
        devices.device_here("cuda:1")
    with pytest.raises(ValueError, match="device=None: not a torch device"):  # torch's TypeError, named
        devices.as_device(None)
