"""Chat templates written for alignctl: the default one for base models without a template, and the ones of the
built-in tiny model families (shaped like each family's own, not copies)."""

# Default chat template for base models that have none (documented in the README).
# Zephyr-style turns, each closed by the tokenizer's EOS token, so the EOS learnt at
# SFT is the one generation stops on in every later stage. The {% generation %}
# markers let TRL compute assistant-only losses.
# A conversation ends with its last EOS (turns are separated by a newline, none follows the last one), so
# a reward model trained on chat-formatted pairs scores the same last token that PPO scores: the EOS the
# policy stops on (TRL's PPO scores prompt + answer truncated at that EOS).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n<|assistant|>\n' }}{% endif %}"
)

# Chat templates of the tiny families, written for alignctl in the shape of each family's own (not copies).
# Phi-3 style: role tags, turns closed by <|end|>; no {% generation %} markers (assistant-only loss cannot use it).
PHI3_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# Mistral style: [INST] ... [/INST] answer</s>; refuses a system turn (as Mistral's v0.1 template does).
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('This template has no system role: merge the system text "
    "into the first user turn') }}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
# Gemma style: <start_of_turn>user|model ... <end_of_turn>; refuses a system turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' + m['content'] "
    "+ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
