//! The kernel matrix: what must work on every supported kernel, run on each kernel other than
//! the default one (which the whole suite covers): 50 round trips on 4 CPUs under the
//! self-verifying workload, the refusals (no SVM, a corrupted image, kvm_amd owning SVM, an
//! agent built for another kernel) and a gdb session. The scenarios are the suite's own
//! (`tests/src/scenarios.rs`, `tests/src/session.rs`); each test names its kernel.

use qs_testkit::KernelId;
use quicksilver_tests::*;

/// The build for kernel `id` (`cargo xtask test` builds every supported kernel).
fn on(id: &str) -> Artifacts {
    let id: KernelId = id.parse().expect("a supported kernel");
    Artifacts::locate_id(id)
        .unwrap_or_else(|e| panic!("{e}: run `cargo xtask test` (it builds every kernel first)"))
}

/// The build for a kernel other than `a`'s, whose agent `a`'s kernel must refuse.
fn another_than(a: &Artifacts) -> Artifacts {
    let other = KernelId::ALL
        .into_iter()
        .find(|id| id.series != a.kernel.id.series)
        .expect("two series");
    Artifacts::locate_id(other).unwrap_or_else(|e| panic!("{e}"))
}

macro_rules! matrix {
    ($($kernel:ident = $id:literal),* $(,)?) => {$(
        mod $kernel {
            use super::*;

            #[test]
            fn fifty_round_trips_on_4_cpus() {
                scenarios::round_trips(&on($id), concat!("matrix-", $id, "-switch"), 4, 50);
            }

            #[test]
            fn bad_images_are_refused() {
                scenarios::bad_images(&on($id), concat!("matrix-", $id, "-bad-images"));
            }

            #[test]
            fn a_cpu_without_svm_is_refused() {
                scenarios::no_svm(&on($id), concat!("matrix-", $id, "-no-svm"));
            }

            #[test]
            fn kvm_owning_svm_is_refused() {
                scenarios::kvm_owns_svm(&on($id), concat!("matrix-", $id, "-kvm"));
            }

            #[test]
            fn an_agent_built_for_another_kernel_is_refused() {
                let a = on($id);
                scenarios::a_module_for_another_kernel(
                    &a,
                    concat!("matrix-", $id, "-foreign-ko"),
                    &another_than(&a),
                );
            }

            #[test]
            fn a_gdb_session() {
                session::gdb_session(&on($id), concat!("matrix-", $id, "-gdb"));
            }
        }
    )*};
}

// The default kernel (6.12-generic) runs the whole suite; it also gets the foreign-agent
// check, which the suite has nowhere else.
matrix!(
    kernel_6_12_cloud = "6.12-cloud",
    kernel_6_1_cloud = "6.1-cloud",
    kernel_6_1_generic = "6.1-generic",
);

#[test]
fn the_default_kernel_refuses_an_agent_built_for_another_kernel() {
    let a = artifacts();
    scenarios::a_module_for_another_kernel(&a, "foreign-ko", &another_than(&a));
}
