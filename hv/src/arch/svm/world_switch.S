// The world switch: every instruction that changes worlds lives in this file.
//
// 1. qs_entry_activate(cpu): the agent's call on each CPU (from an IPI, interrupts off).
//    It saves the callee-saved registers where Rust's `activate` can read them, so that the
//    guest can later "return" from this very call with those registers intact. `activate`
//    returns here only if the CPU stays native (RAX = status).
// 2. qs_enter_host(cpu, stack_top, host_ctx): after `activate` has built the VMCB and set
//    EFER.SVME. CLGI first, so that no NMI or interrupt can arrive while CR3, GDT and IDT are
//    half switched; then the hv's stack (the kernel's is not mapped in the hv's tables), CR3,
//    GDT (with CS reloaded by a far return) and IDT, and on into `host_main`, which never
//    returns.
// 3. qs_run_guest(regs, vmcb_pa): one VMRUN. VMRUN and #VMEXIT switch only RAX, RSP, RIP and
//    RFLAGS among the general registers (APM vol. 2, 15.5), so the guest's others are loaded
//    from and stored to `regs` here. FS, GS, TR, LDTR and the SYSCALL MSRs are never switched:
//    the hv does not use them, so the guest's values simply stay in the CPU.
// 4. qs_leave_native(state, efer, cs, ss): the way back to bare metal, after `leave_native`
//    has put back the guest's CR3, CR4, CR0, GDT and IDT. Loads the kernel selectors cs and ss
//    and the guest's DS and ES, STGI, writes EFER without SVME, then IRETQ to the guest's
//    CS:RIP, RFLAGS and SS:RSP with every register restored.
// 5. qs_host_exc_stubs: 32 stubs of 16 bytes for the hv's own IDT (exceptions in host mode
//    are hv bugs: they are reported on the serial port and the CPU stops).
// 6. qs_host_nmi: the hv's NMI handler. GIF is set in host mode only inside qs_take_nmi and
//    qs_sleep_until_nmi (step 7), so only they are ever interrupted by it (elsewhere in host
//    mode an NMI stays pending; on the way out, qs_leave_native's STGI comes after the
//    kernel's IDT is back). It sets EAX = 1 to tell them an NMI was taken, and returns past
//    the HLT of qs_sleep_until_nmi when the NMI came right before it (it was pending at
//    STGI): that HLT would otherwise wait for the next NMI, which may never come.
// 7. qs_take_nmi(): takes an NMI held pending by GIF = 0, if any; qs_sleep_until_nmi(): halts
//    until an NMI (RFLAGS.IF is 0 in host mode: interrupts do not wake it). Both return 1 if
//    an NMI was taken, else 0, with GIF clear again.
//
// Offsets below are those of GuestRegs and NativeState in arch/svm/mod.rs (checked there).

// Loads every general register but RAX and RSP from the GuestRegs at RDI (RDI last).
.macro LOAD_GPRS
    mov rbx, [rdi + 0]
    mov rcx, [rdi + 8]
    mov rdx, [rdi + 16]
    mov rsi, [rdi + 24]
    mov rbp, [rdi + 40]
    mov r8,  [rdi + 48]
    mov r9,  [rdi + 56]
    mov r10, [rdi + 64]
    mov r11, [rdi + 72]
    mov r12, [rdi + 80]
    mov r13, [rdi + 88]
    mov r14, [rdi + 96]
    mov r15, [rdi + 104]
    mov rdi, [rdi + 32]
.endm

.section .text.qs_entry_activate, "ax"
.global qs_entry_activate
qs_entry_activate:
    endbr64
    push r15
    push r14
    push r13
    push r12
    push rbp
    push rbx
    mov rsi, rsp                // &EntryFrame: rbx, rbp, r12..r15, return address
    sub rsp, 8                  // 16-byte alignment for the call
    call {activate}
    add rsp, 8
    pop rbx
    pop rbp
    pop r12
    pop r13
    pop r14
    pop r15
    ret

.section .text.qs_world, "ax"
.global qs_enter_host
qs_enter_host:
    clgi
    mov rsp, rsi                // the hv's stack: mapped in both address spaces, unlike the kernel's
    xor ebp, ebp
    mov rax, [rdx + 0]          // HostContext.cr3
    mov cr3, rax
    lgdt [rdx + 8]              // HostContext.gdtr
    lidt [rdx + 24]             // HostContext.idtr
    mov ax, 0x10                // HOST_DATA_SELECTOR
    mov ss, ax
    mov ds, ax
    mov es, ax
    lea rax, [rip + 2f]
    push 0x08                   // HOST_CODE_SELECTOR
    push rax
    .byte 0x48, 0xCB            // retfq: reload CS from the hv's GDT
2:
    call {host_main}
    ud2

.global qs_run_guest
qs_run_guest:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    push rdi                    // keep &GuestRegs for after the exit
    mov rax, rsi                // VMRUN takes the VMCB's physical address in RAX
    LOAD_GPRS
    vmrun rax
    // #VMEXIT: RAX, RSP, RIP are the host's again; the other registers are the guest's.
    push rdi
    mov rdi, [rsp + 8]
    mov [rdi + 0], rbx
    mov [rdi + 8], rcx
    mov [rdi + 16], rdx
    mov [rdi + 24], rsi
    mov [rdi + 40], rbp
    mov [rdi + 48], r8
    mov [rdi + 56], r9
    mov [rdi + 64], r10
    mov [rdi + 72], r11
    mov [rdi + 80], r12
    mov [rdi + 88], r13
    mov [rdi + 96], r14
    mov [rdi + 104], r15
    pop rax
    mov [rdi + 32], rax
    add rsp, 8
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret

.global qs_leave_native
qs_leave_native:
    // Kernel CS and SS first (RDX, RCX), from its GDT (loaded by leave_native): an NMI that
    // STGI lets in below is taken by the kernel's handler, which must find kernel selectors
    // to return to (the hv's 0x08 is __KERNEL32_CS in Linux's GDT).
    lea rax, [rip + 3f]
    push rdx
    push rax
    .byte 0x48, 0xCB            // retfq
3:
    mov ss, cx
    mov ax, [rdi + 160]         // NativeState.ds
    mov ds, ax
    mov ax, [rdi + 168]         // NativeState.es
    mov es, ax
    // STGI needs EFER.SVME, so it comes before SVME is cleared (FACTS.md).
    stgi
    mov ecx, 0xC0000080         // EFER
    mov rax, rsi
    mov rdx, rsi
    shr rdx, 32
    wrmsr
    push qword ptr [rdi + 152]  // ss
    push qword ptr [rdi + 144]  // rsp
    push qword ptr [rdi + 136]  // rflags
    push qword ptr [rdi + 128]  // cs
    push qword ptr [rdi + 120]  // rip
    mov rax, [rdi + 112]
    LOAD_GPRS
    iretq

.macro EXC_NOERR vec
    .balign 16
    push 0
    push \vec
    jmp qs_host_exc_common
.endm
.macro EXC_ERR vec
    .balign 16
    push \vec
    jmp qs_host_exc_common
.endm

    .balign 16
.global qs_host_nmi
qs_host_nmi:
    mov eax, 1
    push rcx
    lea rcx, [rip + qs_sleep_hlt]
    cmp [rsp + 8], rcx          // the interrupted RIP
    jne 1f
    add qword ptr [rsp + 8], 1  // past the one-byte HLT
1:
    pop rcx
    iretq

.global qs_take_nmi
qs_take_nmi:
    xor eax, eax
    stgi
    clgi
    ret

.global qs_sleep_until_nmi
qs_sleep_until_nmi:
    xor eax, eax
    stgi
qs_sleep_hlt:
    hlt
    clgi
    ret

.global qs_host_exc_stubs
qs_host_exc_stubs:
    EXC_NOERR 0
    EXC_NOERR 1
    EXC_NOERR 2
    EXC_NOERR 3
    EXC_NOERR 4
    EXC_NOERR 5
    EXC_NOERR 6
    EXC_NOERR 7
    EXC_ERR 8
    EXC_NOERR 9
    EXC_ERR 10
    EXC_ERR 11
    EXC_ERR 12
    EXC_ERR 13
    EXC_ERR 14
    EXC_NOERR 15
    EXC_NOERR 16
    EXC_ERR 17
    EXC_NOERR 18
    EXC_NOERR 19
    EXC_NOERR 20
    EXC_ERR 21
    EXC_NOERR 22
    EXC_NOERR 23
    EXC_NOERR 24
    EXC_NOERR 25
    EXC_NOERR 26
    EXC_NOERR 27
    EXC_NOERR 28
    EXC_ERR 29
    EXC_ERR 30
    EXC_NOERR 31

qs_host_exc_common:
    mov rdi, rsp                // &ExceptionFrame: vector, error, rip, cs, rflags, rsp, ss
    and rsp, -16
    call {host_exception}
    ud2
