//! ferryctl's library half: rendering resources ([`render`]) and cluster templates ([`template`]).

pub mod render;
pub mod template;
