"""Evaluation: layout fidelity (later: OCR text accuracy, aesthetic score, reports)."""
