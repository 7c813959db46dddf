//! Unit tests of the framers: every mode's edges.
