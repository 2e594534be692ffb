//! Floodgate end-to-end test support: mock providers and the cluster harness.
