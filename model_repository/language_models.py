"""Small language models with random weights and a trained byte-level BPE tokenizer, for examples and tests.

Nothing is downloaded: the tokenizer is trained on the text below and the weights are drawn from a fixed seed, so
the same files come out on every machine. The models are tiny (well under 1 MB each) but have the real
architectures (GPT-2 for generation, BERT for embeddings) and are saved with ``save_pretrained`` exactly as a Hugging
Face model folder is, so serving them exercises the same code path as a real model.
"""

from __future__ import annotations

from pathlib import Path

_CORPUS = """
ModelDock serves machine learning models from a folder over HTTP and gRPC. Users drop a model into the repository
and talk to it with the Triton client or the OpenAI client. The server batches requests dynamically, runs many
model instances at once, and streams tokens as a language model generates them. A sequence is admitted when the
cache has room for it; it is retired when it stops. The quick brown fox jumps over the lazy dog. Hello world!
What is the capital of France? Paris is the capital of France. One, two, three, four, five, six, seven, eight,
nine, ten. Tell me a story about a robot who learned to paint. Once upon a time there was a small robot.
The weather today is sunny with a light breeze. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2026.
def main(): print("hello") # code, too. {"key": "value", "list": [1, 2, 3]}
"""

SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Plain messages render as before tools came; with tools the system turn lists them and asks for calls in Hermes'
# (and Qwen's) format, an assistant's earlier calls are written back in it and tool results come as the user's
# ``<tool_response>``, so ``parameters.tool_call_parser: hermes`` reads what the model writes.
CHAT_TEMPLATE = """\
{%- if tools %}<|system|>{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}

{% endif %}# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML \
tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>
{% endif %}
{%- for message in messages %}
{%- if message['role'] == 'system' and tools and loop.first %}
{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}<|assistant|>{{ message['content'] or '' }}
{%- for call in message['tool_calls'] %}<tool_call>
{"name": {{ call['function']['name'] | tojson }}, "arguments": {{ call['function']['arguments'] | tojson }}}
</tool_call>
{% endfor %}
{%- elif message['role'] == 'tool' %}<|user|><tool_response>
{{ message['content'] }}
</tool_response>
{% else %}<|{{ message['role'] }}|>{{ message['content'] }}
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|assistant|>{% endif %}"""


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (any text encodes, nothing is unknown) wrapped for ``transformers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_causal_lm(
    out: Path,
    *,
    seed: int = 0,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_positions: int = 256,
    vocab_size: int = 512,
    initializer_range: float = 0.2,
    drawn_positions: int | None = None,
) -> Path:
    """A GPT-2 model folder (config, safetensors weights, tokenizer, generation config) at ``out``.

    The wide ``initializer_range`` spreads the logits, so greedy decoding has clear winners and the same prompt
    decodes to the same tokens whether it runs alone or in a batch. With ``drawn_positions`` the model is drawn
    with that many positions and the rest of its ``n_positions`` are appended from a seed of their own: a model
    grown that way keeps every weight it had, so its answers to short prompts do not change.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer(vocab_size)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_positions=drawn_positions or n_positions,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config).eval()
    if drawn_positions is not None and n_positions > drawn_positions:
        generator = torch.Generator().manual_seed(seed + 1)
        extra = torch.normal(0.0, initializer_range, (n_positions - drawn_positions, n_embd), generator=generator)
        grown = torch.nn.Embedding(n_positions, n_embd)
        with torch.no_grad():
            grown.weight.copy_(torch.cat([model.transformer.wpe.weight, extra]))
        model.transformer.wpe = grown
        model.config.n_positions = n_positions
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_encoder(
    out: Path, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2, vocab_size: int = 512
) -> Path:
    """A BERT encoder folder for embeddings (mean-pooled last hidden state)."""
    import torch
    from transformers import BertConfig, BertModel

    tokenizer = build_tokenizer(vocab_size)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = BertModel(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
