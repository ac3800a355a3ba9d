# ruff: noqa: RUF001  (Chinese text, with its full-width commas)
"""Tiny IndexTTS2 model files with random weights, made by the real library's own classes.

`build(root)` writes every repository IndexTTS2 loads (the checkpoints and the four hub models, as
`tts_worker.models.manifest` names them) under `root/<org>/<name>/`, in the formats the library reads:
`IndexTTS2(model_dir=...)` then loads, runs on the CPU and returns audio, just as with the real
weights, only fast and meaningless. Sizes the library hard-wires are kept (`gpt.model_dim` 1280,
1024-wide semantic features from the 17th w2v-bert layer, CAMPPlus 80 -> 192, 80 mel bins, 22050 Hz);
everything else is as small as the code allows.

Two weights are set rather than random, so that tests can rely on what they do:
- the GPT ends each segment's speech codes after exactly `CODES_PER_SEGMENT` codes (its mel head
  sees the position and nothing else), so a segment's length is fixed and the audio's length tells
  how many segments the real segmenter made;
- the emotion model (a tiny Qwen3, which upstream decodes greedily for up to 32768 tokens) answers
  every prompt at once with `EMOTION_ANSWER`, then `<|im_end|>`.

Deterministic: the same seed gives the same files. Nothing here is committed as binary; a test
session builds it once (a few seconds) in a temporary folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

__all__ = [
    "CODES_PER_SEGMENT",
    "EMOTION_ANSWER",
    "SAMPLES_PER_SEGMENT",
    "build",
    "end_segments_after",
    "install_hub_cache",
]

CODES_PER_SEGMENT = 12
"""Speech codes per segment: the s2mel stage makes 1.72 mel frames of 256 samples of each."""
SAMPLES_PER_SEGMENT = int(CODES_PER_SEGMENT * 1.72) * 256
EMOTION_ANSWER = '{"惊讶": 0.6, "高兴": 0.3}'
"""What the emotion model says about any text: surprised 0.6, happy 0.3 (upstream's Chinese keys)."""

CHECKPOINTS_REPO = "IndexTeam/IndexTTS-2"
_MEL_CODES = 64  # + start and stop tokens
_EMO_NUM = (3, 17, 2, 8, 4, 5, 10, 24)  # rows per emotion in feat1.pt / feat2.pt, as upstream
_HUB_COMMIT = "0" * 40

_CONFIG = f"""\
dataset:
    bpe_model: bpe.model
    sample_rate: 24000
    squeeze: false
gpt:
    model_dim: 1280
    max_mel_tokens: 1815
    max_text_tokens: 600
    heads: 4
    use_mel_codes_as_input: true
    mel_length_compression: 1024
    layers: 1
    number_text_tokens: {{text_tokens}}
    number_mel_codes: {_MEL_CODES + 2}
    start_mel_token: {_MEL_CODES}
    stop_mel_token: {_MEL_CODES + 1}
    start_text_token: 0
    stop_text_token: 1
    train_solo_embeddings: false
    condition_type: "conformer_perceiver"
    condition_module:
        output_size: 32
        linear_units: 32
        attention_heads: 2
        num_blocks: 1
        input_layer: "conv2d2"
        perceiver_mult: 1
    emo_condition_module:
        output_size: 32
        linear_units: 32
        attention_heads: 2
        num_blocks: 1
        input_layer: "conv2d2"
        perceiver_mult: 1
semantic_codec:
    codebook_size: {_MEL_CODES + 2}
    hidden_size: 1024
    codebook_dim: 8
    vocos_dim: 32
    vocos_intermediate_dim: 32
    vocos_num_layers: 1
s2mel:
    preprocess_params:
        sr: 22050
        spect_params:
            n_fft: 1024
            win_length: 1024
            hop_length: 256
            n_mels: 80
            fmin: 0
            fmax: "None"
    dit_type: "DiT"
    reg_loss_type: "l1"
    style_encoder:
        dim: 192
    length_regulator:
        channels: 32
        is_discrete: false
        in_channels: 1024
        content_codebook_size: 64
        sampling_ratios: [1]
        vector_quantize: false
        n_codebooks: 1
        quantizer_dropout: 0.0
        f0_condition: false
        n_f0_bins: 64
    DiT:
        hidden_dim: 32
        num_heads: 2
        depth: 1
        class_dropout_prob: 0.1
        block_size: 8192
        in_channels: 80
        style_condition: true
        final_layer_type: 'wavenet'
        target: 'mel'
        content_dim: 32
        content_codebook_size: 64
        content_type: 'discrete'
        f0_condition: false
        n_f0_bins: 64
        content_codebooks: 1
        is_causal: false
        long_skip_connection: true
        zero_prompt_speech_token: false
        time_as_token: false
        style_as_token: false
        uvit_skip_connection: true
        add_resblock_in_transformer: false
    wavenet:
        hidden_dim: 32
        num_layers: 1
        kernel_size: 5
        dilation_rate: 1
        p_dropout: 0.2
        style_condition: true
gpt_checkpoint: gpt.pth
w2v_stat: wav2vec2bert_stats.pt
s2mel_checkpoint: s2mel.pth
emo_matrix: feat2.pt
spk_matrix: feat1.pt
emo_num: {list(_EMO_NUM)}
qwen_emo_path: qwen0.6bemo4-merge/
vocoder:
    type: "bigvgan"
    name: "nvidia/bigvgan_v2_22khz_80band_256x"
version: 2.0
"""

# Words in several scripts for the BPE model: English, Chinese and digits must tokenize to known pieces.
_BPE_CORPUS = """\
Hello there. This is a test of the queue, with a few sentences to speak.
The quick brown fox jumps over the lazy dog; numbers: 0 1 2 3 4 5 6 7 8 9.
你好，世界。今天天气很好，我们去公园散步吧。语音合成测试。
WHAT ARE YOU DOING? I AM SPEAKING, SLOWLY AND CLEARLY - A WARM-UP!
A B C D E F G H I J K L M N O P Q R S T U V W X Y Z a b c d e f g h i j k l m n o p q r s t u v w x y z
"""


def build(root: Path, *, seed: int = 0) -> dict[str, Path]:
    """Write every repository under `root/<org>/<name>/`; returns the folders by repository id."""
    import torch

    torch.manual_seed(seed)
    folders = {
        CHECKPOINTS_REPO: root / CHECKPOINTS_REPO,
        "facebook/w2v-bert-2.0": root / "facebook/w2v-bert-2.0",
        "amphion/MaskGCT": root / "amphion/MaskGCT",
        "funasr/campplus": root / "funasr/campplus",
        "nvidia/bigvgan_v2_22khz_80band_256x": root / "nvidia/bigvgan_v2_22khz_80band_256x",
    }
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    checkpoints = folders[CHECKPOINTS_REPO]
    text_tokens = _bpe_model(checkpoints / "bpe.model")
    config_text = _CONFIG.replace("{text_tokens}", str(text_tokens))
    (checkpoints / "config.yaml").write_text(config_text, encoding="utf-8")
    (checkpoints / "README.md").write_text("Tiny random IndexTTS2 weights for tests.\n", encoding="utf-8")

    from omegaconf import OmegaConf

    config = OmegaConf.create(config_text)
    _gpt(config, checkpoints / "gpt.pth")
    _s2mel(config, checkpoints / "s2mel.pth")
    _matrices(checkpoints)
    _qwen_emotion(checkpoints / "qwen0.6bemo4-merge")
    _w2v_bert(folders["facebook/w2v-bert-2.0"])
    _semantic_codec(config, folders["amphion/MaskGCT"] / "semantic_codec" / "model.safetensors")
    _campplus(folders["funasr/campplus"] / "campplus_cn_common.bin")
    _bigvgan(folders["nvidia/bigvgan_v2_22khz_80band_256x"])
    return folders


def install_hub_cache(folders: dict[str, Path], hub_cache: Path) -> None:
    """Lay the hub models out as `huggingface_hub` caches them (`models--org--name/refs/main` and
    `snapshots/<commit>/`), where the library finds them with HF_HUB_OFFLINE=1."""
    for repo_id, folder in folders.items():
        if repo_id == CHECKPOINTS_REPO:
            continue
        cached = hub_cache / f"models--{repo_id.replace('/', '--')}"
        (cached / "refs").mkdir(parents=True, exist_ok=True)
        (cached / "refs" / "main").write_text(_HUB_COMMIT)
        snapshot = cached / "snapshots" / _HUB_COMMIT
        if snapshot.exists():
            shutil.rmtree(snapshot)
        shutil.copytree(folder, snapshot, copy_function=_link_or_copy)


def _link_or_copy(source: str, destination: str) -> None:
    try:
        Path(destination).hardlink_to(source)
    except OSError:
        shutil.copy2(source, destination)


def _bpe_model(path: Path) -> int:
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_BPE_CORPUS.splitlines() * 4),
        model_writer=model,
        model_type="bpe",
        vocab_size=160,
        character_coverage=1.0,
        # upstream's TextTokenizer takes id 0 as <s> and 1 as </s>
        bos_id=0,
        eos_id=1,
        unk_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return sentencepiece.SentencePieceProcessor(model_file=str(path)).get_piece_size()


def _gpt(config: Any, path: Path) -> None:
    import torch
    from indextts.gpt.model_v2 import UnifiedVoice

    gpt = UnifiedVoice(**config.gpt)
    state = gpt.state_dict()
    end_segments_after(CODES_PER_SEGMENT, state, stop_token=config.gpt.stop_mel_token)
    torch.save(state, path)


def end_segments_after(codes: int, state: dict[str, Any], *, stop_token: int) -> None:
    """Rig a UnifiedVoice state (IndexTTS2's or 2.5's) so that every segment ends after `codes`
    speech codes: the transformer block adds nothing to the residual stream, and the mel head reads
    only dimension 0, which the mel position embedding sets to "go on" before `codes` and to "stop"
    from there on (the head's stop row is the only one that reads it)."""
    for name, tensor in state.items():
        if name.endswith(("attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")):
            tensor.zero_()
    positions = state["mel_pos_embedding.emb.weight"]
    positions[:codes, 0] = -40.0
    positions[codes:, 0] = 40.0
    head = state["mel_head.weight"]
    head[:, 0] = 0.0
    head[stop_token, :] = 0.0
    head[stop_token, 0] = 4.0
    state["mel_head.bias"].zero_()
    state["final_norm.weight"].fill_(1.0)
    state["final_norm.bias"].zero_()


def _s2mel(config: Any, path: Path) -> None:
    import torch
    from indextts.s2mel.modules.commons import MyModel

    model = MyModel(config.s2mel, use_gpt_latent=True)
    torch.save({"net": {name: module.state_dict() for name, module in model.models.items()}}, path)


def _matrices(checkpoints: Path) -> None:
    import torch

    rows = sum(_EMO_NUM)
    torch.save(torch.randn(rows, 192), checkpoints / "feat1.pt")  # speakers, compared with CAMPPlus styles
    torch.save(torch.randn(rows, 1280) * 0.02, checkpoints / "feat2.pt")  # emotions, in the GPT's space
    torch.save({"mean": torch.zeros(1024), "var": torch.ones(1024)}, checkpoints / "wav2vec2bert_stats.pt")


def _w2v_bert(folder: Path) -> None:
    from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertModel

    SeamlessM4TFeatureExtractor().save_pretrained(folder)
    config = Wav2Vec2BertConfig(
        hidden_size=1024,  # the width IndexTTS2 reads
        num_hidden_layers=17,  # it reads hidden_states[17]
        num_attention_heads=1,
        intermediate_size=8,
        conv_depthwise_kernel_size=3,
        position_embeddings_type=None,
        add_adapter=False,
    )
    Wav2Vec2BertModel(config).save_pretrained(folder)
    for extra in folder.glob("generation_config.json"):
        extra.unlink()


def _semantic_codec(config: Any, path: Path) -> None:
    import safetensors.torch
    from indextts.utils.maskgct_utils import build_semantic_codec

    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_model(build_semantic_codec(config.semantic_codec), str(path))


def _campplus(path: Path) -> None:
    import torch
    from indextts.s2mel.modules.campplus.DTDNN import CAMPPlus

    torch.save(CAMPPlus(feat_dim=80, embedding_size=192).state_dict(), path)


def _bigvgan(folder: Path) -> None:
    import torch
    from indextts.s2mel.modules.bigvgan.bigvgan import BigVGAN
    from indextts.s2mel.modules.bigvgan.env import AttrDict

    hparams = {
        "resblock": "1",
        "upsample_rates": [4, 4, 4, 4],  # 256 samples per mel frame
        "upsample_kernel_sizes": [8, 8, 8, 8],
        "upsample_initial_channel": 32,
        "resblock_kernel_sizes": [3],
        "resblock_dilation_sizes": [[1, 3, 5]],
        "use_tanh_at_final": False,
        "use_bias_at_final": False,
        "activation": "snakebeta",
        "snake_logscale": True,
        "num_mels": 80,
        "n_fft": 1024,
        "hop_size": 256,
        "win_size": 1024,
        "sampling_rate": 22050,
        "fmin": 0,
        "fmax": None,
    }
    (folder / "config.json").write_text(json.dumps(hparams, indent=2))
    generator = BigVGAN(AttrDict(hparams), use_cuda_kernel=False)
    torch.save({"generator": generator.state_dict()}, folder / "bigvgan_generator.pt")


def _qwen_emotion(folder: Path) -> None:
    """A Qwen3 whose answer does not depend on the question: its layers add nothing, so each next
    token is a function of the current one. The chat template ends with <|answer|>, after which it
    says EMOTION_ANSWER (one added token); after anything else, <|im_end|>."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    specials = ["<|unk|>", "<|im_start|>", "<|im_end|>", "<|answer|>"]
    characters = [chr(c) for c in range(32, 127)]
    vocab = {token: index for index, token in enumerate(specials + characters)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<|unk|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|answer|>"],
    )
    fast.add_tokens([EMOTION_ANSWER])
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<|answer|>{% endif %}"
    )
    fast.save_pretrained(folder)
    trigger, answer, end = (
        fast.convert_tokens_to_ids(t) for t in ("<|answer|>", EMOTION_ANSWER, "<|im_end|>")
    )

    hidden = 16
    config = Qwen3Config(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        eos_token_id=end,
        pad_token_id=end,
        bos_token_id=end,
    )
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                parameter.zero_()  # the layers add nothing to the residual stream
        embedding = model.model.embed_tokens.weight
        embedding.zero_()
        embedding[:, 0] = 1.0  # every token: "say <|im_end|>" ...
        embedding[trigger, 1] = 1.0  # ... but after <|answer|>, the answer
        head = model.lm_head.weight
        head.zero_()
        head[end, 0] = 1.0
        head[answer, 1] = 3.0
    model.save_pretrained(folder)
    GenerationConfig(eos_token_id=end, pad_token_id=end, do_sample=False).save_pretrained(folder)
