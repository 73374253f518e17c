"""The CLI: one-line errors with exit code 2, and no output left behind by bad input."""

from __future__ import annotations

import json

import pytest

from qsched.card import ScheduleCard
from qsched.cli import main
from qsched.quant import parse_preset
from qsched.schedule import QSchedCoefficients


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_card(path, *, family="lcm", steps=2, quant="w4a8"):
    ScheduleCard(
        coefficients=QSchedCoefficients.from_ramps(cx_start=1.1, ceps_start=0.9, num_steps=steps),
        model="tiny", family=family, quant=parse_preset(quant).to_dict(), steps=steps,
    ).save(path)
    return str(path)


def test_generate_with_card(tiny_pipeline_path, tmp_path, capsys):
    card = write_card(tmp_path / "card.json")
    code, out, err = run(capsys, "generate", "a shoe", "a bag", "--model", str(tiny_pipeline_path("lcm")),
                         "--card", card, "--height", "32", "--width", "32", "--out", str(tmp_path / "out"),
                         "--no-progress")
    assert code == 0, err
    assert "wrote 2 images" in out and "w4a8, 2 steps" in out
    records = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert [r["quant"] for r in records] == ["w4a8", "w4a8"] and records[0]["card"] == card


BAD_INPUTS = [
    (["--quant", "w3a8"], "unknown quantization preset 'w3a8'; allowed: fp, w8a8"),
    (["--model", "org/not-cached-model"], "not cached locally"),
    (["--model", "/nonexistent/folder"], "/nonexistent/folder"),
    (["--steps", "0"], "expected a positive integer, got 0"),
    (["--device", "cuda"], "no CUDA GPU is available"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUTS, ids=[m[:24] for _, m in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_pipeline_path, tmp_path, capsys, extra, message):
    argv = ["generate", "a shoe", "--model", str(tiny_pipeline_path("lcm")), "--out", str(tmp_path / "out")]
    code, _, err = run(capsys, *argv, *extra)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bad_files(tiny_pipeline_path, tmp_path, capsys):
    model = str(tiny_pipeline_path("lcm"))
    out = str(tmp_path / "out")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"format": "qsched-schedule-card", "vers')
    cases = [
        (["--prompts", str(empty)], "holds no prompts"),
        (["x", "--card", str(corrupt)], "not valid JSON"),
        (["x", "--card", write_card(tmp_path / "flux.json", family="flux-schnell")], "family 'flux-schnell', not 'lcm'"),
        (["x", "--card", write_card(tmp_path / "c4.json", steps=4), "--steps", "2"], "4 steps, not 2"),
        (["x", "--card", write_card(tmp_path / "c.json"), "--quant", "w8a8"], "schedule card is for recipe 'w4a8' but the requested recipe is 'w8a8'"),
        ([], "no prompts given"),
    ]
    for extra, message in cases:
        code, _, err = run(capsys, "generate", "--model", model, "--out", out, *extra)
        assert code == 2 and message in err, (extra, err)
        assert not (tmp_path / "out").exists()


def test_output_folder_not_empty(tiny_pipeline_path, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    code, _, err = run(capsys, "generate", "x", "--model", str(tiny_pipeline_path("lcm")), "--out", str(out))
    assert code == 2 and "--overwrite" in err


def test_debug_shows_traceback(tmp_path, capsys):
    from qsched.errors import QSchedError

    with pytest.raises(QSchedError):
        main(["--debug", "generate", "x", "--quant", "bogus", "--model", str(tmp_path), "--out", str(tmp_path / "o")])


def test_families_lists_paper_defaults(capsys):
    code, out, _ = run(capsys, "families")
    assert code == 0
    for name in ("lcm", "pcm-sd15", "pcm-sdxl", "sdxl-turbo", "flux-schnell"):
        assert name in out


def test_usage_error_is_one_line(capsys):
    assert main(["generate", "--seed", "minus"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_quantize_then_generate_from_packed_matches_direct_quantization(tiny_pipeline_path, tmp_path, capsys):
    model = str(tiny_pipeline_path("lcm"))
    packed = tmp_path / "unet-w4a8.safetensors"
    code, out, err = run(capsys, "quantize", "--model", model, "--quant", "w4a8", "--out", str(packed))
    assert code == 0, err
    assert "quantization w4a8" in out and "smaller" in out
    common = ["generate", "a shoe", "--model", model, "--steps", "2", "--height", "32", "--width", "32", "--no-progress"]
    assert run(capsys, *common, "--packed", str(packed), "--out", str(tmp_path / "a"))[0] == 0
    assert run(capsys, *common, "--quant", "w4a8", "--out", str(tmp_path / "b"))[0] == 0
    assert (tmp_path / "a" / "00000.png").read_bytes() == (tmp_path / "b" / "00000.png").read_bytes()
    code, _, err = run(capsys, "quantize", "--model", model, "--quant", "w4a8", "--out", str(packed))
    assert code == 2 and "--overwrite" in err
    code, _, err = run(capsys, "quantize", "--model", model, "--quant", "w8a16", "--out", str(tmp_path / "x.bin"))
    assert code == 2 and ".safetensors" in err


def test_threads_option(monkeypatch, capsys):
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert main(["--threads", "1", "families"]) == 0
    assert calls == [1]
    assert main(["--threads", "0", "families"]) == 2


def test_train_forwards_to_the_stage(tmp_path, capsys):
    from qsched.builtin.data import write_fake_dataset

    data = str(write_fake_dataset(tmp_path / "data", n=16))
    tiny = ["--shape", "tiny", "--max-templates", "1", "--batch-size", "4", "--log-every", "1"]
    out = tmp_path / "teacher"
    code, _, err = run(capsys, "train", "teacher", "--steps", "2", "--out", str(out), "--data-root", data, *tiny)
    assert code == 0, err
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    assert run(capsys, "train", "bogus")[0] == 2


def test_bad_checkpoints_and_packed_files_exit_2_and_write_nothing(tiny_pipeline_path, tmp_path, capsys):
    import shutil

    lcm = tiny_pipeline_path("lcm")
    truncated = tmp_path / "truncated"
    shutil.copytree(lcm, truncated)
    weights = next((truncated / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-64])
    other = tmp_path / "sdxl-w4a8.safetensors"
    assert run(capsys, "quantize", "--model", str(tiny_pipeline_path("sdxl-turbo")), "--quant", "w4a8",
               "--out", str(other))[0] == 0
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = tmp_path / "out"
    gen = ["generate", "a shoe", "--out", str(out), "--no-progress"]
    cases = [
        ([*gen, "--model", str(truncated), "--quant", "w4a8"], "truncated"),
        (["quantize", "--model", str(truncated), "--quant", "w4a8", "--out", str(out / "x.safetensors")], "truncated"),
        ([*gen, "--model", str(lcm), "--packed", str(other)], "was made from another model configuration"),
        ([*gen, "--model", str(lcm), "--packed", str(next((lcm / "unet").glob("*.safetensors")))],
         "is not a qsched packed checkpoint"),
        (["quantize", "--model", str(lcm), "--quant", "w4a8", "--out", str(blocker / "x.safetensors")],
         "which is a file, not a folder"),
        ([*gen, "--model", str(lcm), "--quant", "w4a8", "--quantize-modules", "denoiser,nope"], "no component 'nope'"),
        ([*gen, "--model", str(lcm), "--quant", "w4a8", "--quantize-modules", "vae,vae"], "names a component twice"),
        ([*gen, "--model", str(lcm), "--backend", "int3"], "invalid choice: 'int3'"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "sdxl-w4a8.safetensors", "truncated"]


OUT_UNDER_A_FILE = {
    "generate": ["generate", "x", "--out", "{out}"],
    "calibrate": ["calibrate", "--out", "{out}"],
    "evaluate": ["evaluate", "--out", "{out}"],
    "quantize": ["quantize", "--quant", "w4a8", "--out", "{out}.safetensors"],
    "tiny": ["tiny", "lcm", "--out", "{out}"],
    "train-teacher": ["train", "teacher", "--steps", "1", "--out", "{out}"],
    "train-student": ["train", "student", "--steps", "1", "--out", "{out}"],
    "train-flow-teacher": ["train", "flow-teacher", "--steps", "1", "--out", "{out}"],
    "train-flow-student": ["train", "flow-student", "--steps", "1", "--out", "{out}"],
    "train-clip": ["train", "clip", "--steps", "1", "--out", "{out}"],
    "train-ship": ["train", "ship", "{model}", "{out}"],
}


@pytest.mark.parametrize("command", list(OUT_UNDER_A_FILE))
def test_out_under_a_file_is_one_line_exit_2(tiny_pipeline_path, tmp_path, capsys, command):
    model = str(tiny_pipeline_path("lcm"))
    (tmp_path / "A").write_text("a file, not a folder\n")
    argv = [a.format(out=tmp_path / "A" / "B", model=model) for a in OUT_UNDER_A_FILE[command]]
    if argv[0] in ("generate", "calibrate", "evaluate", "quantize"):
        argv += ["--model", model]
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1
    assert f"lies under {tmp_path / 'A'}, which is a file, not a folder" in err
    assert (tmp_path / "A").read_text() == "a file, not a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A"]


def test_prepare_output_dir_refuses_a_path_under_a_file(tmp_path):
    from qsched.errors import QSchedError
    from qsched.outdir import prepare_output_dir

    (tmp_path / "A").write_text("x")
    with pytest.raises(QSchedError, match="lies under .*A, which is a file"):
        prepare_output_dir(tmp_path / "A" / "B" / "C", overwrite=True, owned=())
    with pytest.raises(QSchedError, match="exists and is not a folder"):
        prepare_output_dir(tmp_path / "A", overwrite=True, owned=())
