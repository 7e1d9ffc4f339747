//! The conformance suite every [`super::Store`] backend must pass.
