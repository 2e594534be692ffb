//! Floodgate operator (not yet: see README).

fn main() {}
