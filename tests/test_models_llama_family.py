"""Llama, Mistral, Mixtral, Qwen2, Qwen3 and Phi-3 against transformers, loaded the way the loader loads them.

transformers saves each tiny random model; ModelStore reads the folder, plans
the fused layout (q/k/v, gate/up, stacked experts) and streams it into shared
memory; the runner maps it and runs. The saved model is the oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import transformers
from paged_harness import (
    NUM_BLOCKS,
    Sequence,
    assert_close_relative,
    check_mixed_batch,
    check_prefill_then_decode,
    hf_reference,
    make_step,
    random_prompt,
    shuffled_blocks,
)
from tiny_models import TINY_LLAMA as TINY

from llmexec.errors import CheckpointError
from llmexec.loader.checkpoint import open_checkpoint
from llmexec.loader.model_store import LoadedModel, ModelStore
from llmexec.loader.shm_store import SharedWeights
from llmexec.loader.weight_plan import materialize, plan_weights, specs_of
from llmexec.models.config_keys import standard_config
from llmexec.models.registry import architecture_of, model_class_for, supported_architectures
from llmexec.runner.model_runner import ModelRunner
from llmexec.runner.weight_attach import attach_weights

WINDOW = 8  # shorter than the test prompts, so the sliding window cuts keys
SPECIAL_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # inside the tiny vocabulary

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY),
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=WINDOW),
    "mixtral": lambda: transformers.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2),
    # Layer 0 full attention, layer 1 windowed: a per-layer window. Tied embeddings, q/k/v bias.
    "qwen2": lambda: transformers.Qwen2Config(
        **TINY, tie_word_embeddings=True, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
    ),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=32),  # head_dim != hidden / heads
    "phi3": lambda: transformers.Phi3Config(
        **TINY,
        **SPECIAL_TOKENS,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
    ),
}


@dataclass
class Family:
    name: str
    hf_model: torch.nn.Module
    loaded: LoadedModel
    weights: dict[str, torch.Tensor]  # the runner's views of the loader's shared memory

    def runner(self, block_size: int = 16, config: dict | None = None) -> ModelRunner:
        config = self.loaded.config if config is None else config
        return ModelRunner(config, self.weights, num_blocks=NUM_BLOCKS, block_size=block_size)


def hf_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request, tmp_path_factory):
    model = hf_model(request.param)
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model.save_pretrained(folder)
    store = ModelStore()
    try:
        loaded = store.load(str(folder))
        yield Family(request.param, model, loaded, attach_weights(loaded.weights.layout))
    finally:
        store.close()


def test_prefill_then_decode_matches_transformers(family):
    prompt = random_prompt(12, seed=1, vocab_size=TINY["vocab_size"])  # longer than WINDOW
    check_prefill_then_decode(family.runner(), hf_reference(family.hf_model), prompt, steps=24)


@pytest.mark.parametrize("block_size", [1, 5, 16])  # 5 divides none of the lengths
def test_mixed_prefill_and_decode_batch_matches_transformers(family, block_size):
    check_mixed_batch(family.runner(block_size), hf_reference(family.hf_model), TINY["vocab_size"])


def test_parameters_are_views_of_the_loaders_shared_memory(family):
    runner = family.runner()
    params = dict(runner.model.named_parameters())
    assert params.keys() == family.weights.keys()
    for name, param in params.items():
        assert param.data_ptr() == family.weights[name].data_ptr(), name
    # Fused and stacked from the files as transformers' own state dict fuses them in memory
    # (for Mixtral that one is already stacked: the two paths share no stacking code).
    state_dict = family.hf_model.state_dict()
    config = family.loaded.config
    expected = materialize(plan_weights(type(runner.model), config, specs_of(state_dict)), state_dict)
    for name, param in params.items():  # (transformers' state dict also lists a tied lm_head)
        assert torch.equal(param, expected[name]), name


@pytest.mark.parametrize("name", ["mistral", "qwen2"])
def test_chunked_prompt_much_longer_than_the_window(name):
    """A 40-token prompt (5 windows) prefilled in chunks of 11, each chunk's window reaching into
    earlier chunks' keys in the cache, then decoded; without the window the logits differ."""
    model = hf_model(name)
    config = model.config.to_dict()
    weights = materialize(
        plan_weights(model_class_for(architecture_of(config), config), config, specs_of(model.state_dict())),
        model.state_dict(),
    )
    runner = ModelRunner(config, weights, num_blocks=NUM_BLOCKS, block_size=5)
    reference = hf_reference(model)
    seq = Sequence(random_prompt(40, seed=7, vocab_size=TINY["vocab_size"]), shuffled_blocks(), 5)
    for query_len in (11, 11, 11):
        runner.execute(make_step([seq.chunk(query_len)]))
    for _ in range(4):
        logits = runner.execute_logits(make_step([seq.chunk()]))[0]
        ref = reference(seq.token_ids)
        assert_close_relative(logits, ref)
        seq.token_ids.append(int(ref.argmax()))
    unwindowed = ModelRunner({**config, "sliding_window": None}, weights, num_blocks=NUM_BLOCKS, block_size=5)
    full = Sequence(seq.token_ids, shuffled_blocks(), 5)
    logits = unwindowed.execute_logits(make_step([full.chunk()]))[0]
    assert (logits - reference(seq.token_ids)).abs().max() > 1e-3


def test_plan_refuses_checkpoints_missing_a_part_or_holding_both_forms():
    llama = hf_model("llama").state_dict()
    llama_cls = model_class_for("LlamaForCausalLM")
    config = hf_model("llama").config.to_dict()
    specs = specs_of({k: v for k, v in llama.items() if k != "model.layers.1.self_attn.k_proj.weight"})
    with pytest.raises(
        CheckpointError, match=r"^/ckpt: model\.layers\.1\.self_attn\.qkv_proj\.weight.*lacks \['k_proj'\]"
    ):
        plan_weights(llama_cls, config, specs, source="/ckpt")
    fused = {"model.layers.0.self_attn.qkv_proj.weight": torch.zeros(128, 64)}
    with pytest.raises(CheckpointError, match="both a fused tensor and its parts"):
        plan_weights(llama_cls, config, specs_of({**llama, **fused}))

    mixtral = hf_model("mixtral")
    per_expert = {
        f"model.layers.0.block_sparse_moe.experts.{e}.{part}.weight": torch.zeros(128, 64)
        for e in range(4)
        for part in ("w1", "w3")
    }
    del per_expert["model.layers.0.block_sparse_moe.experts.3.w3.weight"]
    with pytest.raises(CheckpointError, match=r"mlp\.experts\.gate_up_proj.*w3 of expert 3"):
        plan_weights(model_class_for("MixtralForCausalLM"), mixtral.config.to_dict(), specs_of(per_expert))


class Tampered:
    """The checkpoint with one tensor replaced (or dropped) in the stream but not in its header."""

    def __init__(self, checkpoint, name, replacement):
        self.checkpoint, self.name, self.replacement, self.source = checkpoint, name, replacement, checkpoint.source

    def tensor_specs(self):
        return self.checkpoint.tensor_specs()

    def iter_tensors(self):
        for name, tensor in self.checkpoint.iter_tensors():
            if name != self.name:
                yield name, tensor
            elif self.replacement is not None:
                yield name, self.replacement


def test_streaming_into_fused_targets_checks_each_part(tmp_path):
    hf_model("mixtral").save_pretrained(tmp_path)
    checkpoint = open_checkpoint(str(tmp_path))
    plan = plan_weights(model_class_for(checkpoint.architecture), checkpoint.config, checkpoint.tensor_specs())
    expert = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: tensor {expert} has shape \[3, 3\]"):
        SharedWeights.create("test-family-tampered", Tampered(checkpoint, expert, torch.zeros(3, 3)), plan=plan)
    query = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(CheckpointError, match=rf"never read: {query}"):
        SharedWeights.create("test-family-tampered", Tampered(checkpoint, query, None), plan=plan)


def test_every_registered_architecture_builds_and_takes_transformers_weights():
    """Each architecture in the registry, from a tiny transformers config: our model builds, and
    transformers' own state dict, through the weight plan, fills every parameter with the right shape."""
    causal_lm_names = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    model_type_of = {architecture: model_type for model_type, architecture in causal_lm_names.items()}
    tiny = {**TINY, **SPECIAL_TOKENS, "num_local_experts": 4, "ffn_dim": 128}
    for architecture in supported_architectures():
        defaults = transformers.AutoConfig.for_model(model_type_of[architecture])
        config = transformers.AutoConfig.for_model(
            model_type_of[architecture], **{key: value for key, value in tiny.items() if hasattr(defaults, key)}
        )
        model = transformers.AutoModelForCausalLM.from_config(config)
        config_dict = standard_config({**config.to_dict(), "architectures": [architecture]})  # as the runner reads it
        model_class = model_class_for(architecture, config_dict)
        ours = model_class(config_dict)
        state_dict = model.state_dict()
        ours.load_weights(materialize(plan_weights(model_class, config_dict, specs_of(state_dict)), state_dict))
        assert all(param.device.type == "cpu" for param in ours.parameters()), architecture
