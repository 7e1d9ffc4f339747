//! The embedded store: one redb file, nothing to install.
