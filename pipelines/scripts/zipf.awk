# Writes n words drawn from a Zipf-like law over a vocabulary of ranks (seeded, deterministic).
BEGIN {
    srand(seed)
    for (i = 0; i < n; i++) {
        rank = int(1 / (rand() + 1e-4))
        printf "w%d%s", rank, (i % 16 == 15 ? "\n" : " ")
    }
    printf "\n"
}
