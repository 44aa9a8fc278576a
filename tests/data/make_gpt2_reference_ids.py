#!/usr/bin/env python3
"""Writes the tiktoken `gpt2` ids of each string in gpt2_reference_strings.txt as JSON.

Run where tiktoken and its gpt2 encoding are available (the lead runs it on the device machine):
    python3 tests/data/make_gpt2_reference_ids.py tests/data/gpt2_reference_strings.txt > tests/data/gpt2_reference_ids.json
Strings are encoded as ordinary text (encode_ordinary), as nibble's Gpt2Tokenizer::encode does.
"""
import json
import sys

import tiktoken

enc = tiktoken.get_encoding("gpt2")
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
