"""The named chat templates of mergekit configs (``chat_template: chatml``).

mergekit 0.1.5 names five templates, each a file in its package's data folder: ``alpaca``,
``chatml``, ``exaone``, ``llama3`` and ``mistral``. mergekit is only a test extra here, so no
template is read from it at run time. Instead we carry the text of a template ourselves where
it is a standard published one and mergekit's file renders every conversation as that one does
(with transformers' Jinja settings: trim_blocks, lstrip_blocks), so that the output's
``chat_template.jinja`` behaves as mergekit's (tests/test_mergekit_config.py renders both):

- ``chatml``: the ChatML format (``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, and
  ``<|im_start|>assistant\\n`` as the generation prompt), in the Jinja text of Hugging Face's
  chat-templating guide;
- ``mistral``: the template Mistral AI publishes in the ``tokenizer_config.json`` of its
  Mistral-7B-Instruct-v0.1 and Mixtral-8x7B-Instruct-v0.1 models (``[INST] ... [/INST]`` turns,
  a system message folded into the first user turn, alternation enforced); mergekit's file is
  that text.

The other three are refused, naming why (the fix is to give the template's Jinja text):
mergekit's ``llama3`` and ``exaone`` files render a newline (``exaone``: indentation too) after
every turn, outside the block tags, which Meta's Llama 3 Instruct and LG's EXAONE 3.0 published
templates do not, so neither published text would reproduce mergekit's output and mergekit's
own text is not ours to copy; ``alpaca`` is mergekit's own format (no Alpaca preamble, a
``user_context`` role for ``### Input:``), not the published Alpaca prompt.
"""

from __future__ import annotations

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must \
alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception \
of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

NAMED: dict[str, str] = {"chatml": CHATML, "mistral": MISTRAL}
"""mergekit's template names we carry, and their text."""

REFUSED: dict[str, str] = {
    "llama3": "mergekit's llama3 file renders a newline after every turn, unlike Meta's "
              "published Llama 3 template, so neither gives mergekit's output here",
    "exaone": "mergekit's exaone file renders indentation and newlines after every turn, "
              "unlike LG's published EXAONE template, so neither gives mergekit's output here",
    "alpaca": "mergekit's alpaca template is its own format (no Alpaca preamble, a "
              "user_context role), not the published Alpaca prompt",
}
"""mergekit's other template names, and why they are refused."""
