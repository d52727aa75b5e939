"""Convert published GPT-2 weights into npgpt checkpoints, with no torch or TensorFlow.

    read_source(folder)       Hugging Face folder or OpenAI TF checkpoint -> npgpt params + config
    convert(folder, out_dir)  ... -> out_dir/model.safetensors + tokenizer files
    fetch_from_hub("gpt2")    download (cached, verified) a hub repository's files
    parity.compare(...)       logits / perplexity / greedy agreement of two implementations

Readers: `tf_checkpoint` (TF tensor bundles), `torch_pickle` (pytorch_model.bin through a
restricted unpickler), safetensors via npgpt.checkpoint. Names: the table in `mapping`.
"""

from npgpt.convert.common import ConversionError
from npgpt.convert.converter import Source, convert, read_source
from npgpt.convert.hub import HubError, fetch_from_hub

__all__ = ["ConversionError", "HubError", "Source", "convert", "fetch_from_hub", "read_source"]
