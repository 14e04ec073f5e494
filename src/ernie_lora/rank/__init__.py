"""Pairwise judgement: Swiss-system pairing, Bradley-Terry / Elo scores, aesthetic levels."""
