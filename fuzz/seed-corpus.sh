#!/bin/sh
# Fills fuzz/corpus/pipeline with the seed corpus: the shipped pipelines and fuzz/seeds.
# Run from anywhere; the corpus folder is git-ignored (libFuzzer adds what it finds there).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out="$here/corpus/pipeline"
mkdir -p "$out"
for f in "$here"/../pipelines/*.yaml "$here"/seeds/*.yaml; do
    cp "$f" "$out/$(basename "$(dirname "$f")")-$(basename "$f")"
done
echo "$(ls "$out" | wc -l) files in $out"
