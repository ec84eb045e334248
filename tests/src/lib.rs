//! Harness for end-to-end tests: starts the real control-plane binary and its stores.
