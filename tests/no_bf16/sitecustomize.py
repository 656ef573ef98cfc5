"""A CPU without native bf16 (an AVX2-only AMD EPYC, say) for every Python process that has this
folder on PYTHONPATH (`make test-no-bf16`): /proc/cpuinfo, as md4.train.native_bf16_cpu reads it,
lists no avx512_bf16 / amx_bf16 flag, so `train.bf16=auto` trains in fp32 as it would there."""

import pathlib

_read_text = pathlib.Path.read_text


def _read_text_without_bf16(self, *args, **kwargs):
    text = _read_text(self, *args, **kwargs)
    if str(self) == "/proc/cpuinfo":
        text = text.replace("avx512_bf16", "").replace("amx_bf16", "")
    return text


pathlib.Path.read_text = _read_text_without_bf16
