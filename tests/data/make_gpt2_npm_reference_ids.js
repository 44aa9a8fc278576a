// Writes the ids that the npm package gpt-3-encoder (a JavaScript port of OpenAI's GPT-2
// encoder.py, independent of nibble's C++ code) gives for section 1 of gpt2_reference_strings.txt.
//   node tests/data/make_gpt2_npm_reference_ids.js > tests/data/gpt2_npm_reference_ids.json
const fs = require('fs');
const path = require('path');
const root = path.join(__dirname, '..', '..');
const {encode} = require(path.join(root, '.deps', 'node_modules', 'gpt-3-encoder'));
const version = require(path.join(root, '.deps', 'node_modules', 'gpt-3-encoder', 'package.json')).version;
const lines = fs.readFileSync(path.join(__dirname, 'gpt2_reference_strings.txt'), 'utf-8').split('\n');
const cases = [];
for (const line of lines) {
  if (line.startsWith('# Section 2')) break;
  if (line.startsWith('#') || line.trim() === '') continue;
  const text = JSON.parse(line);
  cases.push({text, ids: encode(text)});
}
// One case per line, so that a diff shows which string changed.
const body = cases.map(c => '  ' + JSON.stringify(c)).join(',\n');
process.stdout.write(`{"generator": "npm gpt-3-encoder ${version}", "cases": [\n${body}\n]}\n`);
