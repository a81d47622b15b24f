"""gps_seg against the CLI's own files: the tiny demo run (conftest.py) gives a base checkpoint,
its GPS artifact and the `merged.safetensors` the Rust merge wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import gps_seg
from gps_seg import GpsSegError, apply_delta, content_hash, load_artifact, read_summary


def base_of(run: Path) -> dict[str, np.ndarray]:
    """The base checkpoint the run was trained from (its `config.json` names it)."""
    cfg = json.loads((run / "config.json").read_text())
    return load_file(cfg["base"])


def test_public_api_is_typed_and_documented() -> None:
    for name in gps_seg.__all__:
        assert getattr(gps_seg, name).__doc__, name
    assert (Path(gps_seg.__file__).parent / "py.typed").is_file()


def test_content_hash_equals_the_one_the_cli_recorded(demo_run: Path) -> None:
    art = load_artifact(demo_run / "gps")
    assert content_hash(base_of(demo_run)) == art.base_content_hash


def test_apply_delta_equals_the_cli_merge_bit_for_bit(demo_run: Path) -> None:
    base = base_of(demo_run)
    pristine = base_of(demo_run)
    art = load_artifact(demo_run / "gps")
    ours = apply_delta(base, art)
    cli = load_file(str(demo_run / "merged.safetensors"))
    assert list(ours) == list(base)
    assert sorted(ours) == sorted(cli)
    changed = 0
    for name, want in cli.items():
        got = np.asarray(ours[name])
        assert got.dtype == want.dtype == np.float32, name
        assert got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), f"tensor `{name}` differs from merged.safetensors"
        changed += int(np.count_nonzero(got.view(np.uint32) != base[name].view(np.uint32)))
    # Not a vacuous comparison: the delta moved entries, in selected and trainable tensors.
    assert changed > 0
    assert art.indices and art.trainable
    # The input is not modified; untouched tensors are passed through as they are.
    assert all(base[n].tobytes() == pristine[n].tobytes() for n in base)
    untouched = next(n for n in base if n not in art.tensors)
    assert ours[untouched] is base[untouched]


def test_apply_delta_refuses_another_base(demo_run: Path) -> None:
    base = base_of(demo_run)
    art = load_artifact(demo_run / "gps")
    # One untouched entry one ulp away: only the content hash can tell.
    untouched = next(n for n in sorted(base) if n not in art.tensors)
    other = dict(base)
    t = base[untouched].copy().reshape(-1)
    t[0] = np.nextafter(t[0], np.float32(np.inf), dtype=np.float32)
    other[untouched] = t.reshape(base[untouched].shape)
    with pytest.raises(GpsSegError, match="content hash .* differs"):
        apply_delta(other, art)
    tuned = next(iter(art.indices))
    missing = {k: v for k, v in base.items() if k != tuned}
    with pytest.raises(GpsSegError, match=f"`{tuned}`: not in the base"):
        apply_delta(missing, art)
    reshaped = dict(base)
    reshaped[tuned] = base[tuned].reshape(-1)
    with pytest.raises(GpsSegError, match=f"`{tuned}`: base has shape"):
        apply_delta(reshaped, art)


def copy_artifact(demo_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "gps"
    shutil.copytree(demo_run / "gps", dst)
    return dst


def test_untrained_artifact_is_refused(demo_run: Path, tmp_path: Path) -> None:
    art_dir = copy_artifact(demo_run, tmp_path)
    (art_dir / "delta.safetensors").unlink()
    art = load_artifact(art_dir)
    assert art.delta is None
    with pytest.raises(GpsSegError, match="no delta.safetensors"):
        apply_delta(base_of(demo_run), art)


def test_load_artifact_names_the_file_and_tensor_at_fault(demo_run: Path, tmp_path: Path) -> None:
    art_dir = copy_artifact(demo_run, tmp_path)
    cfg_path = art_dir / "gps_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["format"] = "something-else/9"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(GpsSegError, match="gps_config.json: unknown format"):
        load_artifact(art_dir)
    shutil.copy(demo_run / "gps" / "gps_config.json", cfg_path)

    sel_path = art_dir / "selection.safetensors"
    sel = load_file(str(sel_path))
    name = next(n for n, i in sel.items() if len(i) > 1)
    bad = dict(sel)
    bad[name] = sel[name][::-1].copy()
    save_file(bad, str(sel_path))
    with pytest.raises(GpsSegError, match=f"selection.safetensors: tensor `{name}`: .*not sorted"):
        load_artifact(art_dir)
    bad[name] = sel[name].astype(np.int64)
    save_file(bad, str(sel_path))
    with pytest.raises(GpsSegError, match=f"tensor `{name}`: indices must be u32"):
        load_artifact(art_dir)
    save_file(sel, str(sel_path))

    delta_path = art_dir / "delta.safetensors"
    delta = load_file(str(delta_path))
    bad = dict(delta)
    bad[name] = delta[name].copy()
    bad[name][0] = np.nan
    save_file(bad, str(delta_path))
    with pytest.raises(
        GpsSegError, match=f"delta.safetensors: tensor `{name}` has nan at flat index 0"
    ):
        load_artifact(art_dir)
    bad = dict(delta)
    bad["not.a.tensor"] = np.zeros(2, np.float32)
    save_file(bad, str(delta_path))
    with pytest.raises(GpsSegError, match="`not.a.tensor`: in the delta but neither"):
        load_artifact(art_dir)
    save_file(delta, str(delta_path))
    assert load_artifact(art_dir).delta is not None


def test_read_summary_reads_the_demo_run(demo_run: Path, tmp_path: Path) -> None:
    s = read_summary(demo_run)
    raw = json.loads((demo_run / "summary.json").read_text())
    assert s.task == "segmentation" and s.method == "gps" and s.selected_on == "val"
    assert s.test["mdice"] == raw["best"]["mdice"] and s.val["mdice"] == raw["val"]["mdice"]
    assert (s.trainable, s.total, s.test_images) == (
        raw["trainable"],
        raw["total"],
        raw["test_images"],
    )
    assert s.merged == demo_run / "merged.safetensors"
    assert s.artifact is not None and load_artifact(s.artifact).delta is not None
    del raw["trainable"]
    (tmp_path / "summary.json").write_text(json.dumps(raw))
    with pytest.raises(GpsSegError, match="summary.json: field `trainable`"):
        read_summary(tmp_path)


def test_torch_state_dict_round_trip(demo_run: Path) -> None:
    torch = pytest.importorskip("torch")
    base = base_of(demo_run)
    art = load_artifact(demo_run / "gps")
    sd = {k: torch.from_numpy(v.copy()) for k, v in base.items()}
    assert content_hash(sd) == art.base_content_hash
    ours = apply_delta(sd, art)
    cli = load_file(str(demo_run / "merged.safetensors"))
    for name, want in cli.items():
        assert isinstance(ours[name], torch.Tensor)
        assert ours[name].numpy().tobytes() == want.tobytes(), name
