"""Model zoo: plain-torch models with seeded weights, split at block boundaries."""
