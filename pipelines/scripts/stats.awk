# Reads `uniq -c | sort -rn` output; writes the vocabulary, token count and the share of the
# most frequent word as JSON metrics.
{ tokens += $1; types += 1; if (NR == 1) top = $1 }
END { printf "{\"tokens\": %d, \"types\": %d, \"top_share\": %.4f}\n", tokens, types, top / tokens }
