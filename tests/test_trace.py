"""The forward-pass trace: every module in execution order, flattened shapes, table/JSON/Mermaid output."""

from __future__ import annotations

import json

import pytest
import torch
from paged_harness import fused_weights  # q/k/v and gate/up fused, as the loader lays them out
from tiny_models import TINY_LLAMA

from llmexec.cli.trace_render import mermaid, table, to_json
from llmexec.runner.model_runner import ModelRunner
from llmexec.runner.server import trace_stage_to_pb
from llmexec.runner.tracer import trace_prefill_and_decode
from llmexec.v1 import runner_pb2


def tiny_model(architecture: str):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if architecture == "llama":
        config = LlamaConfig(**TINY_LLAMA)
    else:
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_trace_lists_every_module_with_flattened_shapes(architecture):
    hf = tiny_model(architecture)
    config = hf.config.to_dict()
    config["architectures"] = [type(hf).__name__]
    runner = ModelRunner(config, fused_weights(config, hf.state_dict()), num_blocks=16, block_size=4)
    prompt = [5, 17, 42, 99, 3, 250, 7]
    prefill, decode = trace_prefill_and_decode(runner, prompt)

    with torch.inference_mode():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=2, do_sample=False,
                               attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    assert [prefill.sampled_token_id, decode.sampled_token_id] == expected

    hidden = config.get("hidden_size") or config["n_embd"]
    for stage, rows in ((prefill, len(prompt)), (decode, 1)):
        assert stage.num_tokens == rows
        root = stage.calls[0]
        assert root.name == "" and root.depth == 0
        assert root.outputs[0].shape == (rows, hidden)
        assert [c.index for c in stage.calls] == list(range(len(stage.calls)))
        # Every leaf module the model owns runs in a step (lm_head runs in compute_logits;
        # pure containers such as ModuleLists are never called themselves).
        traced = {c.name for c in stage.calls}
        leaves = {name for name, m in runner.model.named_modules() if not list(m.children())}
        assert leaves - traced <= {"lm_head"}, leaves - traced
        # Decoder layers see the flattened batch [num_tokens, hidden], never [batch, seq, hidden].
        layers = [c for c in stage.calls if c.name.split(".")[-1].isdigit()]
        assert layers, [c.name for c in stage.calls][:10]
        for layer in layers:
            assert layer.outputs[0].shape == (rows, hidden)
        assert root.seconds >= sum(c.seconds for c in stage.calls if c.depth == 1) * 0.99
        assert all(c.self_seconds <= c.seconds + 1e-9 for c in stage.calls)

    response = runner_pb2.TraceStepResponse(stages=[trace_stage_to_pb(prefill), trace_stage_to_pb(decode)],
                                            architecture=config["architectures"][0])
    assert "decode: 1 tokens" in table(response.stages[1])
    data = json.loads(to_json(response))
    assert data["stages"][1]["calls"][0]["outputs"][0]["shape"] == ["1", str(hidden)]
    chart = mermaid(response)
    assert chart.startswith("flowchart TD")
    assert chart.count("subgraph") == chart.count("\n  end")
    assert "-->" in chart
