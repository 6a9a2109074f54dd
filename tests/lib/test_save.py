"""save_pretrained against PEFT: the same files for the same adapters, and PEFT loads ours."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures import CASES

pytestmark = pytest.mark.slow

# PEFT's bias="all" also writes the modules_to_save wrapper's internal copies of a bias; we do not
PEFT_ONLY = {
    "base_model.model.transformer.ln_f.original_module.bias",
    "base_model.model.transformer.ln_f.modules_to_save.bias",
}


def _tensors(root: Path) -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
    from safetensors import safe_open

    out = {}
    for p in sorted(root.rglob("adapter_model.safetensors")):
        with safe_open(str(p), "pt") as f:
            out[str(p.relative_to(root))] = {
                k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                for k in f.keys()  # noqa: SIM118
            }
    return out


def _config(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    return {k: sorted(v) if isinstance(v, list) else v for k, v in data.items()}


def _resave(case: str, src: Path, out: Path) -> Any:
    from adapterctl.engine.model import AdapterModel

    fn, cfgs = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AdapterModel.from_pretrained(fn(), src)
        for name in cfgs:
            if name != "default":
                model.load_adapter(src / name, adapter_name=name)
        model.save_pretrained(out)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_same_files_as_peft(peft_adapters: dict[str, Path], tmp_path: Path, case: str) -> None:
    src, out = peft_adapters[case], tmp_path / case
    _resave(case, src, out)
    theirs, ours = _tensors(src), _tensors(out)
    assert theirs.keys() == ours.keys()
    for f in theirs:
        assert {k: v for k, v in theirs[f].items() if k not in PEFT_ONLY} == ours[f]
    for cfg in src.rglob("adapter_config.json"):
        assert _config(out / cfg.relative_to(src)) == _config(cfg)
        text = (out / cfg.relative_to(src)).read_text()
        assert not text.endswith("\n")
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True)


@pytest.mark.parametrize(
    "case", ["llama_dora_patterns", "llama_embed", "gpt2_conv1d", "bert_seq_cls"]
)
def test_peft_loads_ours_with_equal_outputs(
    peft_adapters: dict[str, Path], tmp_path: Path, case: str
) -> None:
    import torch
    from peft import PeftModel

    fn, _ = CASES[case]
    ours = _resave(case, peft_adapters[case], tmp_path / case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = PeftModel.from_pretrained(fn(), str(tmp_path / case)).eval()
    ids = torch.arange(12).reshape(2, 6) % 64
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, ours(input_ids=ids).logits
    assert (a - b).abs().max().item() <= 1e-5


def test_saving_is_deterministic_and_selective(
    peft_adapters: dict[str, Path], tmp_path: Path
) -> None:
    model = _resave("multi", peft_adapters["multi"], tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    for f in sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    ):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    model.save_pretrained(tmp_path / "c", selected_adapters=["beta"])
    assert sorted(
        str(p.relative_to(tmp_path / "c")) for p in (tmp_path / "c").rglob("*") if p.is_file()
    ) == [
        "README.md",  # at the root even when the root adapter is not saved, as PEFT does
        "beta/adapter_config.json",
        "beta/adapter_model.safetensors",
    ]
    model.save_pretrained(tmp_path / "d", is_main_process=False)
    assert not (tmp_path / "d").exists()
    from adapterctl.errors import AdapterctlError

    with pytest.raises(AdapterctlError, match="no adapter named `nope`"):
        model.save_pretrained(tmp_path / "e", selected_adapters=["nope"])


def test_writes_into_an_existing_directory_leaving_other_files(
    peft_adapters: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "trainer_state.json").write_text("{}")
    model = _resave("llama_basic", peft_adapters["llama_basic"], out)
    model.save_pretrained(out, safe_serialization=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.bin", "adapter_model.safetensors",
        "trainer_state.json",
    ]  # fmt: skip
    assert (out / "trainer_state.json").read_text() == "{}"
    import torch

    sd = torch.load(out / "adapter_model.bin", weights_only=True)
    assert set(sd) == set(_tensors(out)["adapter_model.safetensors"])


def test_model_card(peft_adapters: dict[str, Path], tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    from adapterctl.format.config import LoraConfig
    from adapterctl.ops.card import card_text

    out = tmp_path / "card"
    model = _resave("llama_dora_patterns", peft_adapters["llama_dora_patterns"], out)
    data = ModelCard.load(out / "README.md").data.to_dict()
    assert data["library_name"] == "peft"
    assert data["pipeline_tag"] == "text-generation"
    assert "base_model" not in data  # the base was built from a config: no Hub id to name
    assert data["tags"] == ["lora", "transformers"]
    (out / "README.md").write_text("---\nlicense: mit\ntags:\n- mytag\n---\n# Mine\n")
    model.save_pretrained(out)
    model.save_pretrained(out)
    text = (out / "README.md").read_text()
    data = ModelCard(text).data.to_dict()
    assert data["license"] == "mit"
    # kept, unlike PEFT (docs/peft-format.md, Trap T15)
    assert data["tags"] == ["lora", "mytag", "transformers"]
    assert text.count("### Framework versions") == 1
    assert "# Mine" in text
    hub = card_text(
        LoraConfig(r=4, base_model_name_or_path="org/base-7b", task_type="SEQ_CLS"), None
    )
    data = ModelCard(hub).data.to_dict()
    assert data["base_model"] == "org/base-7b"
    assert "base_model:adapter:org/base-7b" in data["tags"]
    assert data["pipeline_tag"] == "text-classification"  # PEFT tags causal LMs only
    local = card_text(LoraConfig(r=4, base_model_name_or_path=str(tmp_path)), None)
    assert "base_model" not in ModelCard(local).data.to_dict()


def test_resized_vocabulary_saves_the_embeddings(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from adapterctl.engine.model import get_adapter_model
    from adapterctl.format.config import LoraConfig
    from tests.fixtures import tiny_llama

    tiny_llama().save_pretrained(str(tmp_path / "base"))
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    base.resize_token_embeddings(72)
    model = get_adapter_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match="embedding") as record:
        model.save_pretrained(tmp_path / "out")
    messages = [str(w.message) for w in record]
    assert any("resized during finetuning (64 -> 72 tokens)" in m for m in messages)
    assert any("saving 2 full embedding matrices" in m and "MiB" in m for m in messages)
    shapes = {k: v[0] for k, v in _tensors(tmp_path / "out")["adapter_model.safetensors"].items()}
    assert shapes["base_model.model.model.embed_tokens.weight"] == (72, 32)
    assert shapes["base_model.model.lm_head.weight"] == (72, 32)
    model.save_pretrained(tmp_path / "lean", save_embedding_layers=False)
    assert not any("embed" in k for k in _tensors(tmp_path / "lean")["adapter_model.safetensors"])


def test_patterns_whose_meaning_changes_on_reload_warn(tmp_path: Path) -> None:
    from adapterctl.engine.model import get_adapter_model
    from adapterctl.format.config import LoraConfig
    from tests.fixtures import tiny_llama

    # in memory "q_proj" is tried first (alpha 16); sorted, "layers.1..." comes first (alpha 32)
    config = LoraConfig(
        r=2,
        target_modules=["q_proj"],
        alpha_pattern={"q_proj": 16, "layers.1.self_attn.q_proj": 32},
    )
    model = get_adapter_model(tiny_llama(), config)
    with pytest.warns(
        UserWarning, match=r"model.layers.1.self_attn.q_proj`: alpha_pattern gives 16"
    ):
        model.save_pretrained(tmp_path / "a")
    fine = LoraConfig(
        r=2,
        target_modules=["q_proj"],
        alpha_pattern={"layers.1.self_attn.q_proj": 32, "q_proj": 16},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_adapter_model(tiny_llama(), fine).save_pretrained(tmp_path / "b")


@pytest.mark.parametrize(
    ("layers", "targets"),
    [
        (0, ["c_attn", "c_proj"]),  # GPT-2: fan_in_fan_out set for Conv1D
        (-1, ["query", "value"]),  # BERT SEQ_CLS: classifier/score added to modules_to_save
        (2, "all-linear"),  # expanded to 14 full paths
        (4, "all-linear"),  # 28 paths: condensed to the 7 short names
        (2, None),  # the architecture's default
        (
            4,
            [
                f"model.layers.{i}.self_attn.{m}"
                for i in range(4)
                for m in ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj")
            ],
        ),
    ],
)
def test_fresh_save_stores_target_modules_as_peft(
    tmp_path: Path, layers: int, targets: Any
) -> None:
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    from adapterctl.engine.model import get_adapter_model
    from adapterctl.format.config import LoraConfig
    from tests.fixtures import tiny_bert, tiny_gpt2, tiny_llama

    def build() -> Any:
        return {0: tiny_gpt2, -1: tiny_bert}.get(
            layers, lambda: tiny_llama(num_hidden_layers=layers)
        )()

    task = "SEQ_CLS" if layers == -1 else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(build(), PeftConfig(r=2, target_modules=targets, task_type=task))
        peft.save_pretrained(str(tmp_path / "peft"))
        ours = get_adapter_model(build(), LoraConfig(r=2, target_modules=targets, task_type=task))
        ours.save_pretrained(tmp_path / "ours")
    assert _config(tmp_path / "ours" / "adapter_config.json") == _config(
        tmp_path / "peft" / "adapter_config.json"
    )


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_adapter_dtype_follows_peft(tmp_path: Path, autocast: bool) -> None:
    import torch
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    from adapterctl.engine.model import get_adapter_model
    from adapterctl.format.config import LoraConfig
    from tests.fixtures import tiny_llama

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(
            tiny_llama().to(torch.bfloat16), PeftConfig(r=2, target_modules=["q_proj"]),
            autocast_adapter_dtype=autocast,
        ).save_pretrained(str(tmp_path / "peft"))  # fmt: skip
        get_adapter_model(
            tiny_llama().to(torch.bfloat16), LoraConfig(r=2, target_modules=["q_proj"]),
            autocast_adapter_dtype=autocast,
        ).save_pretrained(tmp_path / "ours")  # fmt: skip
    assert _tensors(tmp_path / "ours") == _tensors(tmp_path / "peft")
    assert {d for _, d in _tensors(tmp_path / "ours")["adapter_model.safetensors"].values()} == {
        "F32" if autocast else "BF16"
    }


def test_tied_embeddings_are_both_saved_untied(tmp_path: Path) -> None:
    from adapterctl.engine.model import get_adapter_model
    from adapterctl.format.config import LoraConfig
    from tests.fixtures import tiny_llama

    model = get_adapter_model(
        tiny_llama(tie_word_embeddings=True), LoraConfig(r=2, target_modules=["q_proj"])
    )
    with pytest.warns(UserWarning, match="saving 2 full embedding matrices"):
        model.save_pretrained(tmp_path / "t", save_embedding_layers=True)
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "t" / "adapter_model.safetensors"))
    a, b = sd["base_model.model.model.embed_tokens.weight"], sd["base_model.model.lm_head.weight"]
    assert bool((a == b).all())


def test_state_dict_kwarg_is_written_as_given(
    tmp_path: Path, peft_adapters: dict[str, Path]
) -> None:
    import torch

    model = _resave("llama_basic", peft_adapters["llama_basic"], tmp_path / "x")
    custom = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 32)}
    model.save_pretrained(tmp_path / "custom", state_dict=custom)
    assert list(_tensors(tmp_path / "custom")["adapter_model.safetensors"]) == list(custom)
    with pytest.raises(TypeError, match="unexpected keyword arguments: bogus"):
        model.save_pretrained(tmp_path / "y", bogus=1)
