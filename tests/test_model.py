"""Speech2Text against transformers' Speech2TextForConditionalGeneration (the reference), on random-weight checkpoints.

transformers does not mask padded frames between its two convolutions, so its batched outputs depend on the batch;
the reference for every utterance is therefore transformers run on that utterance alone, and ours runs the whole
padded batch at once.
"""

import json
import os

import fsspec
import numpy as np
import pytest
import soxr
import torch
from helpers import MUSTC, TINY, random_transformers_model, train_spm

from bench.model import S2T_SMALL
from s2t_model import Speech2Text

transformers = pytest.importorskip("transformers")

# Feature frames of utterances from 0.3 s to 15 s (10 ms a frame), in no particular order.
FRAMES = [298, 28, 1498, 98, 748, 1198]
MAX_NEW_TOKENS = 24


def padded_features(frames, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.zeros(len(frames), max(frames), 80)
    for i, n in enumerate(frames):
        features[i, :n] = torch.randn(n, 80, generator=generator)
    return features, torch.tensor(frames)


def reference_ids(hf, features, frames, **options):
    """transformers' generate on each utterance alone, as lists of ids after the start token, through </s>."""
    results, per_row = [], options.pop("per_row", {})
    for i, n in enumerate(frames):
        extra = {k: v[i] for k, v in per_row.items() if v[i] is not None}
        out = hf.generate(
            input_features=features[i : i + 1, :n],
            attention_mask=torch.ones(1, n, dtype=torch.long),
            do_sample=False,
            **options,
            **extra,
        )
        for row in out.tolist():
            row = row[1:]
            results.append(row[: row.index(2) + 1] if 2 in row else row)
    return results


@pytest.fixture(scope="module")
def spm_files(tmp_path_factory):
    return train_spm(tmp_path_factory.mktemp("spm"), "st", [f"<lang:{lang}>" for lang in MUSTC])


def make_checkpoint(tmp_path_factory, name, seed, tokenizer_files=None, **config):
    folder = tmp_path_factory.mktemp(name)
    if tokenizer_files:
        spm_file, vocab_file = tokenizer_files
        tokenizer = transformers.Speech2TextTokenizer(vocab_file, spm_file, lang_codes="mustc")
        tokenizer.save_pretrained(folder)
        config["vocab_size"] = len(json.load(open(vocab_file)))
    hf = random_transformers_model(seed, **config)
    hf.save_pretrained(folder)
    transformers.Speech2TextFeatureExtractor().save_pretrained(folder)  # as hub checkpoints have it
    return hf, str(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint(tmp_path_factory, "tiny", seed=1, vocab_size=100, **TINY)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_checkpoint(tmp_path_factory, "small", seed=2, **S2T_SMALL)


@pytest.fixture(scope="module")
def multilingual(tmp_path_factory, spm_files):
    """An untied output head and MuST-C language tags, like facebook/s2t-medium-mustc-multilingual-st."""
    return make_checkpoint(
        tmp_path_factory, "mustc", seed=3, tokenizer_files=spm_files, tie_word_embeddings=False, **TINY
    )


@pytest.mark.parametrize("name", ["tiny", "small", "multilingual"])
def test_logits_of_a_padded_batch_equal_transformers_per_utterance(name, request):
    hf, folder = request.getfixturevalue(name)
    model = Speech2Text.from_pretrained(folder)
    features, lengths = padded_features(FRAMES)
    decoder_input_ids = torch.randint(
        4, model.config.vocab_size, (len(FRAMES), 9), generator=torch.Generator().manual_seed(5)
    )
    decoder_input_ids[:, 0] = model.config.decoder_start_token_id
    with torch.no_grad():
        logits = model(features, lengths, decoder_input_ids)
        assert logits.shape == (len(FRAMES), 9, model.config.vocab_size)
        for i, n in enumerate(FRAMES):
            reference = hf(
                input_features=features[i : i + 1, :n],
                attention_mask=torch.ones(1, n, dtype=torch.long),
                decoder_input_ids=decoder_input_ids[i : i + 1],
            ).logits[0]
            assert (logits[i] - reference).abs().max().item() <= 1e-4, f"utterance {i} ({n} frames)"


def test_encoding_in_length_groups_equals_transformers_per_utterance(tiny):
    from s2t_model.decoding import encode_in_length_groups

    hf, folder = tiny
    model = Speech2Text.from_pretrained(folder)
    frames = [500, 470, 28, 300, 290, 460]  # groups {500, 470, 460}, {300, 290}, {28}: shared and lone groups
    features, lengths = padded_features(frames)
    with torch.no_grad():
        states, mask = encode_in_length_groups(model, features, lengths)
        for i, n in enumerate(frames):
            reference = hf.model.encoder(features[i : i + 1, :n], attention_mask=torch.ones(1, n, dtype=torch.long))
            reference = reference.last_hidden_state[0]
            assert mask[i].sum().item() == len(reference) and not mask[i, len(reference) :].any()
            assert (states[i, : len(reference)] - reference).abs().max().item() <= 1e-4, f"utterance {i} ({n} frames)"


@pytest.mark.parametrize("name", ["tiny", "small"])
@pytest.mark.parametrize("num_beams", [1, 5])
def test_generate_equals_transformers(name, num_beams, request):
    hf, folder = request.getfixturevalue(name)
    model = Speech2Text.from_pretrained(folder)
    features, lengths = padded_features(FRAMES, seed=1)
    out = model.generate(features, lengths, num_beams=num_beams, max_new_tokens=MAX_NEW_TOKENS)
    expected = reference_ids(hf, features, FRAMES, num_beams=num_beams, max_new_tokens=MAX_NEW_TOKENS)
    assert out.ids == expected
    assert len(out.scores) == len(FRAMES) and all(s <= 0 for s in out.scores)
    # The test model must exercise both ways of stopping, or it would not test them.
    if name == "tiny":
        assert {len(ids) < MAX_NEW_TOKENS for ids in expected} == {True, False}


def test_generate_beam_options_equal_transformers(tiny):
    hf, folder = tiny
    model = Speech2Text.from_pretrained(folder)
    features, lengths = padded_features(FRAMES, seed=2)
    for options in (
        dict(num_beams=4, length_penalty=0.6, early_stopping=False),
        dict(num_beams=3, length_penalty=2.0, early_stopping="never"),
        dict(num_beams=5, num_return_sequences=3),
        dict(num_beams=2, max_length=12),
    ):
        options = options if "max_length" in options else {"max_new_tokens": MAX_NEW_TOKENS} | options
        out = model.generate(features, lengths, **options)
        assert out.ids == reference_ids(hf, features, FRAMES, **options), options


def test_forced_target_language_per_row_equals_transformers(multilingual):
    hf, folder = multilingual
    model = Speech2Text.from_pretrained(folder)
    hf_tokenizer = transformers.Speech2TextTokenizer.from_pretrained(folder)
    features, lengths = padded_features(FRAMES, seed=3)
    langs = ["fr", "de", None, "es", "fr", "it"]
    forced = [None if lang is None else hf_tokenizer.lang_code_to_id[lang] for lang in langs]
    for num_beams in (1, 5):
        out = model.generate(features, lengths, num_beams=num_beams, max_new_tokens=MAX_NEW_TOKENS, tgt_lang=langs)
        expected = reference_ids(
            hf,
            features,
            FRAMES,
            num_beams=num_beams,
            max_new_tokens=MAX_NEW_TOKENS,
            per_row={"forced_bos_token_id": forced},
        )
        assert out.ids == expected
        assert [ids[0] for ids, f in zip(out.ids, forced) if f is not None] == [f for f in forced if f is not None]
    with pytest.raises(ValueError, match="xx"):
        model.generate(features, lengths, tgt_lang="xx")


@pytest.mark.parametrize("name", ["tiny", "multilingual"])
def test_save_pretrained_loads_in_transformers_with_the_same_logits(name, request, tmp_path):
    hf, folder = request.getfixturevalue(name)
    Speech2Text.from_pretrained(folder).save_pretrained(tmp_path)
    reloaded = transformers.Speech2TextForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.config.tie_word_embeddings == hf.config.tie_word_embeddings
    features, _ = padded_features([300], seed=4)
    decoder_input_ids = torch.tensor([[2, 5, 9, 13, 40]])
    with torch.no_grad():
        expected = hf(input_features=features, decoder_input_ids=decoder_input_ids).logits
        actual = reloaded(input_features=features, decoder_input_ids=decoder_input_ids).logits
    assert torch.equal(expected, actual)
    if name == "multilingual":
        tokenizer = transformers.Speech2TextTokenizer.from_pretrained(tmp_path)
        assert tokenizer.lang_code_to_id == transformers.Speech2TextTokenizer.from_pretrained(folder).lang_code_to_id


def test_loss_equals_transformers(tiny):
    hf, folder = tiny
    model = Speech2Text.from_pretrained(folder)
    features, lengths = padded_features([200], seed=6)
    labels = torch.tensor([[7, 19, 33, 2, -100, -100]])
    logits, loss = model(features, lengths, labels=labels)
    with torch.no_grad():
        expected = hf(input_features=features, labels=labels).loss
    assert abs(loss.item() - expected.item()) < 1e-5
    loss.backward()  # the loss trains the model: gradients reach the first convolution
    assert model.model.encoder.conv.conv_layers[0].weight.grad.abs().sum() > 0


def test_pickle_checkpoint_fsspec_urls_and_stale_position_tables(tiny, tmp_path):
    hf, folder = tiny
    features, lengths = padded_features([150, 60], seed=7)
    expected = Speech2Text.from_pretrained(folder).generate(features, lengths, num_beams=2, max_new_tokens=10).ids

    # The multilingual MuST-C checkpoint ships only a pickle, and older ones carry position tables we must ignore.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in os.listdir(folder):
        if name != "model.safetensors":
            (pickled / name).write_bytes(open(os.path.join(folder, name), "rb").read())
    state = dict(hf.state_dict())
    state["model.encoder.embed_positions.weights"] = torch.randn(10, 32)
    torch.save(state, pickled / "pytorch_model.bin")
    assert (
        Speech2Text.from_pretrained(str(pickled)).generate(features, lengths, num_beams=2, max_new_tokens=10).ids
        == expected
    )

    assert (
        Speech2Text.from_pretrained(f"file://{folder}").generate(features, lengths, num_beams=2, max_new_tokens=10).ids
        == expected
    )

    memory = fsspec.filesystem("memory")  # a non-local filesystem: exercises the fetch-into-cache path
    for name in os.listdir(folder):
        memory.pipe(f"/ckpt/{name}", open(os.path.join(folder, name), "rb").read())
    os.environ["S2T_CACHE"] = str(tmp_path / "cache")
    try:
        remote = Speech2Text.from_pretrained("memory://ckpt")
    finally:
        del os.environ["S2T_CACHE"]
    assert remote.generate(features, lengths, num_beams=2, max_new_tokens=10).ids == expected


def test_bad_checkpoints_name_the_problem(tiny, tmp_path):
    hf, folder = tiny
    from safetensors.torch import load_file, save_file

    def variant(name, edit):
        target = tmp_path / name
        target.mkdir()
        for f in os.listdir(folder):
            if f != "model.safetensors":
                (target / f).write_bytes(open(os.path.join(folder, f), "rb").read())
        state = load_file(os.path.join(folder, "model.safetensors"))
        edit(state)
        save_file(state, target / "model.safetensors")
        return str(target)

    key = "model.encoder.layers.1.fc1.weight"
    with pytest.raises(KeyError, match=key):
        Speech2Text.from_pretrained(variant("missing", lambda s: s.pop(key)))
    with pytest.raises(ValueError, match=r"model\.encoder\.layers\.1\.fc1\.weight.*\(64, 33\).*\(64, 32\)"):
        Speech2Text.from_pretrained(variant("misshaped", lambda s: s.__setitem__(key, torch.zeros(64, 33))))
    with pytest.raises(FileNotFoundError, match="config.json"):
        Speech2Text.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no-such"):
        Speech2Text.from_pretrained(str(tmp_path / "no-such"))


def test_generate_past_the_first_cache_capacity_equals_transformers(tiny):
    """The KV cache starts with room for 64 tokens and doubles in place: 150 new tokens cross that twice."""
    hf, folder = tiny
    model = Speech2Text.from_pretrained(folder)
    frames = FRAMES[:4]
    features, lengths = padded_features(frames, seed=11)
    for num_beams in (1, 3):
        out = model.generate(features, lengths, num_beams=num_beams, max_new_tokens=150)
        expected = reference_ids(hf, features, frames, num_beams=num_beams, max_new_tokens=150)
        assert out.ids == expected
        assert max(len(ids) for ids in expected) > 128, "no hypothesis outgrew the cache twice"


def test_a_failed_cuda_graph_capture_falls_back_to_eager_decoding(tiny, monkeypatch, caplog):
    from s2t_model import cuda_graphs, decoding

    hf, folder = tiny
    model = Speech2Text.from_pretrained(folder)
    features, lengths = padded_features(FRAMES, seed=12)
    expected = reference_ids(hf, features, FRAMES, num_beams=2, max_new_tokens=MAX_NEW_TOKENS)

    def capture_fails(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs, "step_graph", capture_fails)
    monkeypatch.setattr(decoding, "uses_cuda_graphs", lambda model, features: model.use_cuda_graphs)
    assert model.generate(features, lengths, num_beams=2, max_new_tokens=MAX_NEW_TOKENS).ids == expected
    assert model.use_cuda_graphs is False and "CUDA graph capture failed" in caplog.text


@pytest.mark.parametrize("num_beams", [1, 4])
def test_the_cuda_graph_path_gives_transformers_ids_on_static_buffers(tiny, num_beams, monkeypatch):
    """The graph path's logic - slots padded to a power of two, frames and cache capacity to 64, utterances keeping
    their slot after they finish, beam reordering by slot, a graph's buffers reused by a later batch - stepped
    eagerly on the CPU, where CI runs (on a GPU the same buffers are replayed as a CUDA graph)."""
    from s2t_model import cuda_graphs, decoding

    hf, folder = tiny
    model = Speech2Text.from_pretrained(folder)
    monkeypatch.setattr(decoding, "uses_cuda_graphs", lambda model, features: True)
    for seed, frames in ((16, FRAMES), (17, FRAMES[1:4])):
        features, lengths = padded_features(frames, seed=seed)
        # early_stopping explicit: this random checkpoint sets none, and the two libraries default differently
        options = dict(num_beams=num_beams, max_new_tokens=MAX_NEW_TOKENS, early_stopping=True)
        assert model.generate(features, lengths, **options).ids == reference_ids(hf, features, frames, **options)
    assert sorted(key[0] for key in cuda_graphs.model_graphs(model).by_bucket) == [4, 8]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a lent GPU machine)")


@needs_cuda
@pytest.mark.parametrize("num_beams", [1, 5])
def test_cuda_graphs_give_the_ids_of_eager_cuda_and_cpu(multilingual, num_beams, monkeypatch):
    """Graph buckets (6 utterances in 8 slots, then 3 in 4), a graph reused with stale buffers, languages per row."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 convolutions move near-ties of random weights
    hf, folder = multilingual
    cpu = Speech2Text.from_pretrained(folder)
    graphed = Speech2Text.from_pretrained(folder, device="cuda")
    eager = Speech2Text.from_pretrained(folder, device="cuda")
    eager.use_cuda_graphs = False
    for seed, frames in ((13, FRAMES), (14, FRAMES[:3]), (15, FRAMES[::-1])):
        features, lengths = padded_features(frames, seed=seed)
        langs = ["fr", None, "de", "es", None, "it"][: len(frames)]
        options = dict(num_beams=num_beams, max_new_tokens=MAX_NEW_TOKENS, tgt_lang=langs)
        expected = eager.generate(features, lengths, **options).ids
        assert graphed.generate(features, lengths, **options).ids == expected
        assert cpu.generate(features, lengths, **options).ids == expected
    assert graphed.use_cuda_graphs, "the graphs were not used"


@needs_cuda
def test_cuda_float32_equals_cpu_and_bfloat16_runs(tiny):
    hf, folder = tiny
    features, lengths = padded_features(FRAMES, seed=8)
    expected = Speech2Text.from_pretrained(folder).generate(
        features, lengths, num_beams=5, max_new_tokens=MAX_NEW_TOKENS
    )
    on_gpu = Speech2Text.from_pretrained(folder, device="cuda")
    assert on_gpu.generate(features, lengths, num_beams=5, max_new_tokens=MAX_NEW_TOKENS).ids == expected.ids
    half = Speech2Text.from_pretrained(folder, device="cuda", dtype=torch.bfloat16)
    out = half.generate(features, lengths, num_beams=5, max_new_tokens=MAX_NEW_TOKENS)
    assert len(out.ids) == len(FRAMES) and all(0 < len(ids) <= MAX_NEW_TOKENS for ids in out.ids)


def test_transcribe_equals_transformers_processor_and_generate(multilingual):
    """End to end from waveforms at two sampling rates, against transformers' own extractor, generate and decode."""
    hf, folder = multilingual
    model = Speech2Text.from_pretrained(folder)
    extractor = transformers.Speech2TextFeatureExtractor.from_pretrained(folder)
    hf_tokenizer = transformers.Speech2TextTokenizer.from_pretrained(folder)
    rng = np.random.default_rng(9)
    waves = [(0.1 * rng.standard_normal(int(16000 * s))).astype(np.float32) for s in (0.4, 2.5, 1.2)]
    texts = model.transcribe(waves, sampling_rate=16000, num_beams=3, tgt_lang="fr", max_new_tokens=MAX_NEW_TOKENS)
    expected = []
    for wave in waves:
        inputs = extractor(wave, sampling_rate=16000, return_tensors="pt")
        ids = hf.generate(
            inputs.input_features,
            attention_mask=inputs.attention_mask,
            num_beams=3,
            do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS,
            forced_bos_token_id=hf_tokenizer.lang_code_to_id["fr"],
        )
        expected.append(hf_tokenizer.decode(ids[0], skip_special_tokens=True))
    assert texts == expected
    assert any(texts)
    # Another sampling rate is resampled, never taken as 16 kHz: 8 kHz audio has half the samples for the same time.
    slow = [soxr.resample(w, 16000, 8000) for w in waves]
    assert model.transcribe(slow, sampling_rate=8000, num_beams=3, tgt_lang="fr", max_new_tokens=MAX_NEW_TOKENS) == [
        model.transcribe(
            [soxr.resample(w, 8000, 16000)], 16000, num_beams=3, tgt_lang="fr", max_new_tokens=MAX_NEW_TOKENS
        )[0]
        for w in slow
    ]
