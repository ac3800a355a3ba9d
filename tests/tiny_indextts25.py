"""Tiny IndexTTS-2.5 checkpoints with random weights, made by indextts25-inference's own classes.

`build(folder)` writes what `IndexTTS25(model_dir=folder)` reads: config.yaml, gpt.pth, codec.pth,
s2mel.pth, the tiktoken vocabulary, the emotion and speaker matrices and the w2v-bert statistics. The
three helper models it asks the hub for (w2v-bert-2.0, CAMPPlus, BigVGAN) are IndexTTS2's too: the
ones `tests/tiny_indextts2.py` makes serve both. Unlike IndexTTS2, the GPT's width is free: 32.

As in the IndexTTS2 fixture, the GPT ends each segment after exactly `CODES_PER_SEGMENT` codes, so
lengths are exact: 2.5's codec doubles the frame rate, its s2mel stretches by 1.72 and the
library's duration factor (the inverse of the request's `speed`), BigVGAN makes 256 samples a frame.
Weights are stored in float16 (the library's strict loading casts them), to keep the files small.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from tests.tiny_indextts2 import end_segments_after

__all__ = ["CHECKPOINTS_REPO", "CODES_PER_SEGMENT", "build", "samples_per_segment"]

CHECKPOINTS_REPO = "IndexTeam/IndexTTS-2.5"
CODES_PER_SEGMENT = 12
_MEL_CODES = 64  # + start and stop tokens
_EMO_NUM = (3, 17, 2, 8, 4, 5, 10, 24)
_MODEL_DIM = 32
_TIKTOKEN = "multilingual_zh_ja_yue_char_del.tiktoken"  # the name infer_v2_5.py opens


def samples_per_segment(speed: float = 1.0) -> int:
    """The samples of one segment at the request's `speed`."""
    return int(2 * CODES_PER_SEGMENT * 1.72 / speed) * 256


_CONFIG = f"""\
gpt:
    model_dim: {_MODEL_DIM}
    max_mel_tokens: 1815
    max_text_tokens: 600
    heads: 2
    layers: 1
    number_text_tokens: {{text_tokens}}
    number_mel_codes: {_MEL_CODES + 2}
    start_mel_token: {_MEL_CODES}
    stop_mel_token: {_MEL_CODES + 1}
    start_text_token: 0
    stop_text_token: 1
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
    style_encoder:
        dim: 192
    length_regulator:
        channels: 32
        in_channels: 1024
        content_codebook_size: 16
        sampling_ratios: [1]
    DiT:
        hidden_dim: 32
        num_heads: 2
        depth: 1
        class_dropout_prob: 0.1
        in_channels: 80
        style_condition: true
        final_layer_type: 'wavenet'
        content_dim: 32
        content_codebook_size: 16
        content_type: 'continuous'
        is_causal: false
        long_skip_connection: true
        time_as_token: false
        style_as_token: false
        uvit_skip_connection: true
    wavenet:
        hidden_dim: 32
        num_layers: 1
        kernel_size: 5
        dilation_rate: 1
        p_dropout: 0.0
        style_condition: true
gpt_checkpoint: gpt.pth
w2v_stat: wav2vec2bert_stats.pt
s2mel_checkpoint: s2mel.pth
emo_matrix: feat2.pt
spk_matrix: feat1.pt
emo_num: {list(_EMO_NUM)}
"""


def build(folder: Path, *, seed: int = 0) -> Path:
    """Write the checkpoints repository into `folder`; returns it."""
    import torch
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    text_tokens = _tiktoken(folder / _TIKTOKEN)
    config_text = _CONFIG.replace("{text_tokens}", str(text_tokens))
    (folder / "config.yaml").write_text(config_text, encoding="utf-8")
    config: Any = OmegaConf.create(config_text)
    _gpt(config, folder / "gpt.pth")
    _codec(config, folder / "codec.pth")
    _s2mel(config, folder / "s2mel.pth")
    rows = sum(_EMO_NUM)
    torch.save(torch.randn(rows, 192), folder / "feat1.pt")  # speakers, compared with CAMPPlus styles
    torch.save(torch.randn(rows, _MODEL_DIM) * 0.02, folder / "feat2.pt")  # emotions, in the GPT's space
    torch.save({"mean": torch.zeros(1024), "var": torch.ones(1024)}, folder / "wav2vec2bert_stats.pt")
    return folder


def _half(state: dict[str, Any]) -> dict[str, Any]:
    return {name: (t.half() if t.is_floating_point() else t) for name, t in state.items()}


def _tiktoken(path: Path) -> int:
    """256 single-byte tokens (tiktoken needs every byte), printable bytes first as in GPT-2's order."""
    from indextts25.utils.tokenizer import get_encoding

    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    order = printable + [b for b in range(256) if b not in printable]
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {i}\n" for i, b in enumerate(order)))
    return int(get_encoding(path.name.removesuffix(".tiktoken"), model_dir=str(path.parent)).n_vocab)


def _gpt(config: Any, path: Path) -> None:
    import torch
    from indextts25.gpt.model_v2 import UnifiedVoice

    state = UnifiedVoice(**config.gpt).state_dict()
    end_segments_after(CODES_PER_SEGMENT, state, stop_token=config.gpt.stop_mel_token)
    torch.save(_half(state), path)


def _codec(config: Any, path: Path) -> None:
    import torch
    from indextts25.codec.models import EnhancedCodec

    torch.save({"model": _half(EnhancedCodec(**config.semantic_codec).state_dict())}, path)


def _s2mel(config: Any, path: Path) -> None:
    import torch
    from indextts25.s2mel.modules.commons import MyModel

    model = MyModel(config.s2mel)
    torch.save({"net": {name: _half(module.state_dict()) for name, module in model.models.items()}}, path)
