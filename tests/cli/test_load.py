"""`adapterctl load` end to end on real (tiny) saved bases, against PEFT on the same files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from adapterctl.cli.main import app
from tests.fixtures import CASES, tiny_bert, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.slow
runner = CliRunner()


def invoke(*args: str | Path) -> Any:
    return runner.invoke(app, ["load", *[str(a) for a in args]], prog_name="adapterctl")


def _save_tokenizer(directory: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    vocab["[UNK]"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")
    fast.save_pretrained(str(directory))


@pytest.fixture(scope="session")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny bases saved as transformers directories; llama with a tokenizer, gpt2 without."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for name, fn in (("llama", tiny_llama), ("gpt2", tiny_gpt2), ("bert", tiny_bert)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn().save_pretrained(str(root / name))
        out[name] = root / name
    _save_tokenizer(out["llama"], 64)
    return out


def test_report_json(bases: dict[str, Path], peft_adapters: dict[str, Path]) -> None:
    result = invoke(bases["llama"], peft_adapters["llama_dora_patterns"], "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1
    assert doc["base"]["class"] == "LlamaForCausalLM"
    assert doc["base"]["class_source"] == "task_type CAUSAL_LM"
    assert doc["base"]["device"] == "cpu"
    assert doc["adapter"]["injected"] == {"linear": 6, "modules_to_save": 1}
    assert doc["adapter"]["missing_keys"] == []
    assert doc["adapter"]["unexpected_keys"] == []
    assert doc["adapter"]["trainable_parameters"] == 0


def test_trainable_and_class_from_the_base_config(
    bases: dict[str, Path], peft_adapters: dict[str, Path]
) -> None:
    result = invoke(bases["gpt2"], peft_adapters["gpt2_conv1d"], "--json", "--trainable")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["base"]["class"] == "GPT2LMHeadModel"
    assert doc["base"]["class_source"] == "auto_mapping"
    assert doc["adapter"]["injected"] == {"conv1d": 6}  # c_attn, attn.c_proj, mlp.c_proj x 2
    assert doc["adapter"]["trainable_parameters"] == doc["adapter"]["parameters"] > 0


def test_seq_cls_adapter(bases: dict[str, Path], peft_adapters: dict[str, Path]) -> None:
    result = invoke(bases["bert"], peft_adapters["bert_seq_cls"], "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["base"]["class"] == "BertForSequenceClassification"
    # the wrong class leaves the classifier's keys with nowhere to go: an error, never a silent load
    wrong = invoke(
        bases["bert"], peft_adapters["bert_seq_cls"], "--model-class", "feature-extraction"
    )
    assert wrong.exit_code == 1
    lines = wrong.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("error: 8 adapter key(s) missing from the file: ")
    assert "match nothing in the model: `base_model.model.bert.encoder" in lines[0]
    assert lines[1].startswith("hint: ")


def test_adapter_for_another_base_is_one_error_line(
    bases: dict[str, Path], peft_adapters: dict[str, Path]
) -> None:
    result = invoke(bases["llama"], peft_adapters["gpt2_conv1d"])
    assert result.exit_code == 1
    assert result.stdout == ""
    # the GPT-2 adapter names GPT2LMHeadModel: the llama checkpoint does not fit it
    assert result.stderr.startswith(f"error: `{bases['llama']}` does not fit GPT2LMHeadModel: ")
    assert len(result.stderr.splitlines()) <= 2


def test_adapter_whose_targets_are_not_in_the_base(
    bases: dict[str, Path], peft_adapters: dict[str, Path]
) -> None:
    result = invoke(bases["llama"], peft_adapters["gpt2_conv1d"], "--model-class", "causal-lm")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: no module of the LlamaForCausalLM matches")


def test_missing_key_is_an_error(
    bases: dict[str, Path], peft_adapters: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    src = peft_adapters["llama_basic"]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    sd = load_file(str(src / "adapter_model.safetensors"))
    del sd["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]
    save_file(sd, str(tmp_path / "a" / "adapter_model.safetensors"), metadata={"format": "pt"})
    result = invoke(bases["llama"], tmp_path / "a")
    assert result.exit_code == 1
    assert (
        "1 adapter key(s) missing from the file: `base_model.model.model.layers.1.self_attn.v_proj.lora_A.default.weight`"
        in result.stderr
    )


def test_generate_equals_peft_and_compare_base(
    bases: dict[str, Path], peft_adapters: dict[str, Path]
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = invoke(
        bases["llama"], peft_adapters["llama_basic"], "--prompt", "w1 w2 w3",
        "--max-new-tokens", "8", "--compare-base", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    gen = json.loads(result.stdout)["generation"]
    tok = AutoTokenizer.from_pretrained(str(bases["llama"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(bases["llama"])),
            str(peft_adapters["llama_basic"]),
        )
    ids = tok("w1 w2 w3", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id
        )
        with model.disable_adapter():
            base_out = model.generate(
                **ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id
            )
    n = ids["input_ids"].shape[1]
    assert gen["text"] == tok.decode(out[0, n:], skip_special_tokens=True)
    assert gen["base_text"] == tok.decode(base_out[0, n:], skip_special_tokens=True)
    assert gen["text"] != gen["base_text"]


def test_prompt_needs_a_tokenizer(bases: dict[str, Path], peft_adapters: dict[str, Path]) -> None:
    result = invoke(bases["gpt2"], peft_adapters["gpt2_conv1d"], "--prompt", "hello")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: `{bases['gpt2']}` has no usable tokenizer")
    assert invoke(bases["gpt2"], peft_adapters["gpt2_conv1d"], "--compare-base").exit_code == 2


@pytest.mark.parametrize("case", ["llama_dora_patterns", "llama_embed", "llama_bias"])
def test_merge_to_equals_peft_merge(
    bases: dict[str, Path], peft_adapters: dict[str, Path], tmp_path: Path, case: str
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    base = bases["llama"]
    if case == "llama_bias":
        fn, _ = CASES[case]
        fn().save_pretrained(str(tmp_path / "base_bias"))
        base = tmp_path / "base_bias"
    result = invoke(base, peft_adapters[case], "--merge-to", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["merged_to"] == str(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(base)), str(peft_adapters[case])
        ).merge_and_unload()
        ours = AutoModelForCausalLM.from_pretrained(str(out))
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert ref_sd.keys() == our_sd.keys()
    for key in ref_sd:
        assert (ref_sd[key] - our_sd[key]).abs().max().item() <= 1e-6, key
    again = invoke(base, peft_adapters[case], "--merge-to", out)
    assert again.exit_code == 1
    assert "already exists" in again.stderr


def test_bad_base_directory(peft_adapters: dict[str, Path], tmp_path: Path) -> None:
    result = invoke(tmp_path, peft_adapters["llama_basic"], "--model-class", "causal-lm")
    assert result.exit_code == 1
    assert "is not a transformers model directory" in result.stderr
    result = invoke(tmp_path, peft_adapters["llama_basic"], "--model-class", "nonsense")
    assert result.exit_code == 2  # a usage error, before anything is loaded
    assert "unknown model class 'nonsense'" in result.stderr


def test_cpu_device_map_with_disk_offload(
    bases: dict[str, Path], peft_adapters: dict[str, Path], tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from adapterctl.engine.model import AdapterModel

    ids = torch.arange(12).reshape(2, 6) % 64
    plain = AdapterModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(bases["llama"])),
        peft_adapters["llama_dora_patterns"],
    )
    device_map = {
        "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
        "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
    }  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        offloaded = AutoModelForCausalLM.from_pretrained(
            str(bases["llama"]), device_map=device_map, offload_folder=str(tmp_path / "offload")
        )
    assert offloaded.model.layers[1].self_attn.q_proj.weight.is_meta
    ours = AdapterModel.from_pretrained(offloaded, peft_adapters["llama_dora_patterns"])
    with torch.no_grad():
        expected, got = plain(input_ids=ids).logits, ours(input_ids=ids).logits
    assert (expected - got).abs().max().item() <= 1e-5


def test_bias_all_with_modules_to_save_loads(
    bases: dict[str, Path], peft_adapters: dict[str, Path]
) -> None:
    # PEFT's bias="all" also stores `ln_f.modules_to_save.bias` / `ln_f.original_module.bias`
    result = invoke(bases["gpt2"], peft_adapters["gpt2_bias_all"], "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["adapter"]["injected"] == {"conv1d": 2, "modules_to_save": 1}


def test_key_mapping_renames_before_loading(peft_adapters: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from adapterctl.engine.model import AdapterModel

    src = peft_adapters["llama_basic"]
    d = tmp_path / "renamed"
    d.mkdir()
    (d / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    sd = load_file(str(src / "adapter_model.safetensors"))
    sd = {k.replace(".layers.", ".blocks."): v for k, v in sd.items()}
    save_file(sd, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    plain = AdapterModel.from_pretrained(tiny_llama(), src)
    mapped = AdapterModel.from_pretrained(
        tiny_llama(), d, key_mapping={r"^model\.blocks\.": "model.layers."}
    )
    assert mapped.last_load.missing_keys == []
    for (k1, p1), (k2, p2) in zip(plain.named_parameters(), mapped.named_parameters(), strict=True):
        assert k1 == k2
        assert bool((p1 == p2).all()), k1


@pytest.mark.gpu
def test_gpu_load_equals_cpu(bases: dict[str, Path], peft_adapters: dict[str, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from adapterctl.engine.model import AdapterModel

    ids = torch.arange(12).reshape(2, 6) % 64
    cpu = AdapterModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(bases["llama"])),
        peft_adapters["llama_dora_patterns"],
    )
    gpu = AdapterModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(bases["llama"])).to("cuda"),
        peft_adapters["llama_dora_patterns"],
    )
    assert {p.device.type for n, p in gpu.named_parameters() if "lora_" in n} == {"cuda"}
    with torch.no_grad():
        a, b = cpu(input_ids=ids).logits, gpu(input_ids=ids.cuda()).logits.cpu()
    assert (a - b).abs().max().item() <= 1e-4
    result = invoke(bases["llama"], peft_adapters["llama_basic"], "--json")
    assert json.loads(result.stdout)["base"]["device"].startswith("cuda")


@pytest.mark.gpu
def test_gpu_device_map_cpu_cuda_disk(
    bases: dict[str, Path], peft_adapters: dict[str, Path], tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from adapterctl.engine.model import AdapterModel

    ids = torch.arange(12).reshape(2, 6) % 64
    plain = AdapterModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(bases["llama"])),
        peft_adapters["llama_dora_patterns"],
    )
    device_map = {
        "model.embed_tokens": 0, "model.layers.0": "cpu", "model.layers.1": "disk",
        "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0,
    }  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(
        str(bases["llama"]), device_map=device_map, offload_folder=str(tmp_path / "off")
    )
    ours = AdapterModel.from_pretrained(base, peft_adapters["llama_dora_patterns"])
    with torch.no_grad():
        a, b = plain(input_ids=ids).logits, ours(input_ids=ids.cuda()).logits.cpu()
    assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    ("args", "dtype"),
    [
        (["--dtype", "bfloat16"], "bfloat16"),
        (["--dtype", "bfloat16", "--no-autocast-adapter-dtype"], "bfloat16"),
        (["--device-map", "auto"], "float32"),
        (["--low-cpu-mem-usage", "--device", "cpu"], "float32"),
    ],
)
def test_dtype_device_map_and_meta_options(
    bases: dict[str, Path], peft_adapters: dict[str, Path], args: list[str], dtype: str
) -> None:
    result = invoke(bases["llama"], peft_adapters["llama_dora_patterns"], *args, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["base"]["dtype"] == dtype
    assert doc["base"]["device"] == "cpu"
    assert doc["adapter"]["missing_keys"] == []


def test_cuda_device_without_cuda_is_an_error(
    bases: dict[str, Path], peft_adapters: dict[str, Path]
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = invoke(bases["llama"], peft_adapters["llama_basic"], "--device", "cuda")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: --device cuda: CUDA is not available here")


def test_merge_that_overflows_is_an_error(
    bases: dict[str, Path], peft_adapters: dict[str, Path], tmp_path: Path
) -> None:
    """A merged weight that is not finite where the base's is (lora_alpha 1e308) is an error
    naming the module, and nothing is written (it used to be a broken model with exit 0)."""
    import shutil

    adapter = tmp_path / "huge"
    shutil.copytree(peft_adapters["llama_basic"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1e308}))
    out = tmp_path / "merged"
    result = invoke(bases["llama"], adapter, "--merge-to", out)
    assert result.exit_code == 1, result.output
    (line, *_) = result.stderr.splitlines()
    assert line.startswith("error: merging default into `model.layers.0."), line
    assert "not finite" in line
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["huge"]
