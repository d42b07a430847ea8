"""Shared-memory weights: the loader fills one /dev/shm file, a runner in
another process maps the same pages, and failures leave no file behind."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama

from llmexec.errors import CheckpointError, FailedPreconditionError
from llmexec.loader.checkpoint import open_checkpoint
from llmexec.loader.shm_store import ALIGNMENT, SHM_DIR, SharedWeights
from llmexec.runner.weight_attach import attach_weights


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama saved as a HF folder, and its state dict."""
    model = tiny_llama()
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    return folder, model.state_dict()


@pytest.fixture
def model_id():
    """A unique id, so leftover files of this test can be told apart."""
    model_id = f"test-{uuid.uuid4().hex[:8]}"
    yield model_id
    leftovers = shm_files(model_id)
    for name in leftovers:
        os.unlink(os.path.join(SHM_DIR, name))
    assert not leftovers, f"test left {leftovers} in {SHM_DIR}"


def shm_files(model_id: str) -> list[str]:
    return [name for name in os.listdir(SHM_DIR) if name.startswith(f"llmexec-{model_id}-")]


def test_create_fills_one_aligned_file(tiny, model_id):
    folder, state_dict = tiny
    weights = SharedWeights.create(model_id, open_checkpoint(str(folder)), dtype=None)
    try:
        [segment] = weights.layout.segments
        assert shm_files(model_id) == [os.path.basename(segment.path)]
        assert os.path.getsize(segment.path) == segment.size_bytes
        assert all(location.offset_bytes % ALIGNMENT == 0 for location in weights.layout.tensors)
        assert set(weights.tensors) == set(state_dict)
        for name, tensor in weights.tensors.items():
            assert torch.equal(tensor, state_dict[name]), name
        parameters = sum(tensor.numel() for tensor in state_dict.values())
        assert weights.parameter_count == parameters
        assert weights.bytes_by_dtype == {"float32": 4 * parameters}
    finally:
        weights.close()
    assert shm_files(model_id) == []
    weights.close()  # idempotent


def test_floating_tensors_are_cast_to_the_requested_dtype(tiny, model_id):
    folder, state_dict = tiny
    with SharedWeights.create(model_id, open_checkpoint(str(folder)), dtype=torch.bfloat16) as weights:
        assert {location.dtype for location in weights.layout.tensors} == {"bfloat16"}
        for name, tensor in weights.tensors.items():
            assert torch.equal(tensor, state_dict[name].to(torch.bfloat16)), name
        assert weights.bytes_by_dtype == {"bfloat16": 2 * weights.parameter_count}


# Run in a fresh interpreter: maps the layout, checks every tensor lies inside
# its own mapping of the segment file, and compares values with the checkpoint.
ATTACH_IN_CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from llmexec.loader.checkpoint import open_checkpoint
    from llmexec.runner.weight_attach import attach_weights
    from llmexec.weight_layout import TensorLocation, WeightLayout, WeightSegment

    request = json.load(sys.stdin)
    layout = WeightLayout(
        segments=[WeightSegment(**segment) for segment in request["segments"]],
        tensors=[TensorLocation(**{**t, "shape": tuple(t["shape"])}) for t in request["tensors"]],
    )
    tensors = attach_weights(layout)
    path = layout.segments[0].path
    ranges = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == path:
            begin, end = (int(value, 16) for value in fields[0].split("-"))
            ranges.append((begin, end))
    assert ranges, f"{path} is not mapped"
    for name, tensor in tensors.items():
        last = tensor.data_ptr() + tensor.numel() * tensor.element_size() - 1
        assert any(b <= tensor.data_ptr() and last < e for b, e in ranges), name
    for name, expected in open_checkpoint(request["source"]).iter_tensors():
        assert torch.equal(tensors[name], expected.to(tensors[name].dtype)), name
    print("attached", len(tensors))
    """
)


def test_another_process_maps_the_same_pages(tiny, model_id):
    folder, state_dict = tiny
    with SharedWeights.create(model_id, open_checkpoint(str(folder)), dtype=None) as weights:
        request = dataclasses.asdict(weights.layout) | {"source": str(folder)}
        child = subprocess.run(
            [sys.executable, "-c", ATTACH_IN_CHILD],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert child.returncode == 0, child.stderr
        assert child.stdout.strip() == f"attached {len(state_dict)}"


def test_attach_after_close_is_a_failed_precondition(tiny, model_id):
    folder, _ = tiny
    weights = SharedWeights.create(model_id, open_checkpoint(str(folder)), dtype=None)
    weights.close()
    with pytest.raises(FailedPreconditionError, match="restarted"):
        attach_weights(weights.layout)
    assert shm_files(model_id) == []  # from_file(shared=True) would have recreated it


def test_attached_views_share_the_loader_pages(tiny, model_id):
    folder, _ = tiny
    with SharedWeights.create(model_id, open_checkpoint(str(folder)), dtype=None) as weights:
        attached = attach_weights(weights.layout)
        weights.tensors["model.norm.weight"].fill_(7.0)
        assert torch.all(attached["model.norm.weight"] == 7.0)


def test_wrong_shaped_tensor_in_file_fails_and_leaves_no_file(tiny, model_id, tmp_path):
    folder, _ = tiny
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight"):
        SharedWeights.create(model_id, open_checkpoint(str(tmp_path)), dtype=None)
    assert shm_files(model_id) == []


class Tampered:
    """A checkpoint whose stream disagrees with its header midway, as when
    the file is replaced while it loads."""

    def __init__(self, checkpoint, name, replacement):
        self.checkpoint, self.name, self.replacement = checkpoint, name, replacement
        self.source = checkpoint.source

    def tensor_specs(self):
        return self.checkpoint.tensor_specs()

    def iter_tensors(self):
        for name, tensor in self.checkpoint.iter_tensors():
            if name != self.name:
                yield name, tensor
            elif self.replacement is not None:
                yield name, self.replacement


def test_stream_shape_mismatch_midway_fails_and_leaves_no_file(tiny, model_id):
    folder, _ = tiny
    checkpoint = Tampered(open_checkpoint(str(folder)), "model.layers.1.mlp.down_proj.weight", torch.zeros(3, 3))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight has shape \[3, 3\]"):
        SharedWeights.create(model_id, checkpoint, dtype=None)
    assert shm_files(model_id) == []


def test_tensor_never_streamed_is_listed(tiny, model_id):
    folder, _ = tiny
    checkpoint = Tampered(open_checkpoint(str(folder)), "model.norm.weight", None)
    with pytest.raises(CheckpointError, match=r"never read: model\.norm\.weight"):
        SharedWeights.create(model_id, checkpoint, dtype=None)
    assert shm_files(model_id) == []


def test_stale_segments_of_a_killed_loader_are_removed_and_live_ones_kept(tmp_path):
    """A loader killed with SIGKILL leaves its file; the next loader's start-up sweep removes it."""
    import signal

    from llmexec.loader.shm_store import remove_stale_segments

    model = tiny_llama()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from llmexec.loader.checkpoint import open_checkpoint
            from llmexec.loader.shm_store import SharedWeights
            weights = SharedWeights.create("killed", open_checkpoint({str(folder)!r}))
            print(weights.path, flush=True)
            time.sleep(600)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    killed_path = child.stdout.readline().strip()
    live = SharedWeights.create("live", open_checkpoint(str(folder)))
    try:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        assert os.path.exists(killed_path)  # nothing cleaned up after the kill
        old = time.time() - 60
        for path in (killed_path, live.path):
            os.utime(path, (old, old))
        removed = remove_stale_segments(SHM_DIR)
        assert killed_path in removed and not os.path.exists(killed_path)
        assert live.path not in removed and os.path.exists(live.path)
        # A file that just appeared is never taken, even unlocked.
        young = os.path.join(SHM_DIR, f"llmexec-young-{uuid.uuid4().hex[:8]}")
        open(young, "wb").close()
        try:
            assert young not in remove_stale_segments(SHM_DIR)
        finally:
            os.unlink(young)
    finally:
        live.close()
        if os.path.exists(killed_path):
            os.unlink(killed_path)
