//! `modinfo quicksilver` is the manual of the agent's parameters: every `module_param` in
//! quicksilver.c has a `MODULE_PARM_DESC` that says what it means.

use xtask::agent_source::{agent_c_source, module_params};

#[test]
fn every_parameter_of_the_agent_says_what_it_means() {
    let path = agent_c_source();
    let source = std::fs::read_to_string(&path).unwrap();
    let params = module_params(&source);
    let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
    // The parser still finds the parameters it is meant to check.
    for known in ["image", "link_port", "link_irq", "key_file", "store_mem"] {
        assert!(names.contains(&known), "{known} not found in {names:?}");
    }
    let undocumented: Vec<&str> = params
        .iter()
        .filter(|p| p.description.is_none())
        .map(|p| p.name.as_str())
        .collect();
    assert!(
        undocumented.is_empty(),
        "{} declares module parameters without a MODULE_PARM_DESC, so modinfo cannot explain \
         them: {}; add MODULE_PARM_DESC(<name>, \"what it means, its default, its unit\")",
        path.display(),
        undocumented.join(", ")
    );
}
