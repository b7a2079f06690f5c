import Synchronization
import Testing

@testable import VMM

final class FakeMachine: RunningMachine {
    let events = Mutex<[String]>([])
    func pause() throws { events.withLock { $0.append("pause") } }
    func resume() { events.withLock { $0.append("resume") } }
    func sendCtrlAltDel() { events.withLock { $0.append("ctrl-alt-del") } }
    func replaceDrive(_ driveID: String, pathOnHost: String) throws { events.withLock { $0.append("patch \(driveID) \(pathOnHost)") } }
}

final class FakeLauncher: MachineLauncher {
    let machine = FakeMachine()
    let launched = Mutex<[VMConfig]>([])
    let failure: String?
    init(failure: String? = nil) { self.failure = failure }
    func launch(_ config: VMConfig) throws -> any RunningMachine {
        if let failure { throw ConfigError(failure) }
        if config.bootSource == nil { throw ConfigError("no boot source") }
        launched.withLock { $0.append(config) }
        return machine
    }
}

@Suite struct ControllerTests {
    func call(_ c: VMMController, _ method: String, _ path: String, _ body: String = "") -> APIResponse {
        c.handle(method: method, path: path, body: Array(body.utf8))
    }

    func fault(_ r: APIResponse) -> String {
        if case .object(let o)? = r.body, case .string(let s)? = o["fault_message"] { return s }
        return ""
    }

    @Test func configureThenStartThroughTheAPI() throws {
        let launcher = FakeLauncher()
        let c = VMMController(instanceID: "vm1", launcher: launcher)
        #expect(call(c, "GET", "/").body?.serialized().contains(#""state":"Not started""#) == true)
        #expect(call(c, "PUT", "/machine-config", #"{"vcpu_count": 2, "mem_size_mib": 256}"#).status == 204)
        #expect(call(c, "PUT", "/boot-source", #"{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#).status == 204)
        #expect(call(c, "PATCH", "/machine-config", #"{"mem_size_mib": 512}"#).status == 204)
        #expect(call(c, "GET", "/machine-config").body?.serialized().contains(#""mem_size_mib":512"#) == true)
        #expect(call(c, "PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
        #expect(launcher.launched.withLock { $0.first?.machine.vcpuCount } == 2)
        #expect(call(c, "GET", "/").body?.serialized().contains(#""state":"Running""#) == true)
        #expect(call(c, "GET", "/vm/config").body?.serialized().contains(#""kernel_image_path":"/k""#) == true)
    }

    @Test func changesAfterStartAreRefused() {
        let c = VMMController(
            instanceID: "vm1",
            config: {
                var v = VMConfig(); v.bootSource = BootSource(kernelImagePath: "/k"); return v
            }(), launcher: FakeLauncher())
        #expect(call(c, "PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
        let r = call(c, "PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 64}"#)
        #expect(r.status == 400)
        #expect(fault(r).contains("after starting"))
        #expect(call(c, "PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 400)
    }

    @Test func pauseResumeAndCtrlAltDel() {
        let launcher = FakeLauncher()
        let c = VMMController(instanceID: "vm1", launcher: launcher)
        #expect(fault(call(c, "PATCH", "/vm", #"{"state": "Paused"}"#)).contains("before starting"))
        _ = call(c, "PUT", "/boot-source", #"{"kernel_image_path": "/k"}"#)
        _ = call(c, "PUT", "/actions", #"{"action_type": "InstanceStart"}"#)
        #expect(call(c, "PATCH", "/vm", #"{"state": "Paused"}"#).status == 204)
        #expect(c.state == .paused)
        #expect(call(c, "PATCH", "/vm", #"{"state": "Resumed"}"#).status == 204)
        #expect(call(c, "PUT", "/actions", #"{"action_type": "SendCtrlAltDel"}"#).status == 204)
        #expect(launcher.machine.events.withLock { $0 } == ["pause", "resume", "ctrl-alt-del"])
        #expect(call(c, "PATCH", "/vm", #"{"state": "Sleeping"}"#).status == 400)
    }

    @Test func vsockEntropyAndDrivePatch() {
        let launcher = FakeLauncher()
        let c = VMMController(instanceID: "vm1", launcher: launcher)
        #expect(call(c, "PUT", "/vsock", #"{"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#).status == 204)
        #expect(fault(call(c, "PUT", "/vsock", #"{"guest_cid": 2, "uds_path": "/tmp/v.sock"}"#)).contains("between 3"))
        #expect(call(c, "PUT", "/entropy", "{}").status == 204)
        #expect(c.config.vsock?.guestCID == 3 && c.config.entropy != nil)
        _ = call(c, "PUT", "/drives/root", #"{"drive_id": "root", "path_on_host": "/a", "is_root_device": true}"#)
        #expect(fault(call(c, "PATCH", "/drives/root", #"{"drive_id": "root", "path_on_host": "/b"}"#)).contains("before starting"))
        _ = call(c, "PUT", "/boot-source", #"{"kernel_image_path": "/k"}"#)
        _ = call(c, "PUT", "/actions", #"{"action_type": "InstanceStart"}"#)
        #expect(call(c, "PATCH", "/drives/root", #"{"drive_id": "root", "path_on_host": "/b"}"#).status == 204)
        #expect(fault(call(c, "PATCH", "/drives/nope", #"{"drive_id": "nope", "path_on_host": "/b"}"#)).contains("does not exist"))
        #expect(c.config.drives[0].pathOnHost == "/b")
        #expect(launcher.machine.events.withLock { $0 } == ["patch root /b"])
        #expect(call(c, "PUT", "/vsock", #"{"guest_cid": 4, "uds_path": "/tmp/v.sock"}"#).status == 400)
    }

    @Test func badRequestsGetFaultMessages() {
        let c = VMMController(instanceID: "vm1", launcher: FakeLauncher())
        #expect(fault(call(c, "PUT", "/machine-config", "{not json")).contains("malformed JSON"))
        #expect(fault(call(c, "PUT", "/boot-source", #"{"kernel_image_path": "/k", "x": 1}"#)).contains("unknown field `x`"))
        #expect(fault(call(c, "GET", "/nope")).contains("Invalid request method and/or path"))
        #expect(fault(call(c, "DELETE", "/machine-config")).contains("Invalid request"))
        #expect(fault(call(c, "PUT", "/actions", #"{"action_type": "Explode"}"#)).contains("unknown `action_type`"))
        #expect(fault(call(c, "PUT", "/actions", #"{"action_type": "InstanceStart"}"#)).contains("no boot source"))
        #expect(fault(call(c, "PUT", "/drives/a", #"{"drive_id": "b", "path_on_host": "/x"}"#)).contains("does not match"))
        #expect(call(c, "PUT", "/drives/a", #"{"drive_id": "a", "path_on_host": "/x", "is_root_device": true}"#).status == 204)
        #expect(call(c, "PUT", "/network-interfaces/eth0", #"{"iface_id": "eth0", "host_dev_name": "tap0"}"#).status == 204)
        #expect(call(c, "PUT", "/machine-config", "").status == 400)
    }
}
