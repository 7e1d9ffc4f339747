//! Changes to keys.
