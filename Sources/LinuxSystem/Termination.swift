// LinuxSystem (layer 1): waiting for SIGTERM or SIGINT, for daemons that shut down cleanly.
import Dispatch
import Glibc
import Synchronization

/// Returns when SIGTERM or SIGINT arrives (the signals' default action is turned off first).
public func waitForTermination() async {
    signal(SIGTERM, SIG_IGN)
    signal(SIGINT, SIG_IGN)
    await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
        let once = OnceFlag()
        for number in [SIGTERM, SIGINT] {
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler {
                if once.take() { continuation.resume() }
            }
            source.resume()
            keptSignalSources.keep(source)
        }
    }
}

/// Lets exactly one caller through.
private final class OnceFlag: Sendable {
    private let taken = Mutex(false)
    func take() -> Bool {
        taken.withLock { taken in
            if taken { return false }
            taken = true
            return true
        }
    }
}

/// Signal sources live as long as the process.
private final class SignalSourceList: @unchecked Sendable {
    // SAFETY: `sources` is only touched under `lock`; the sources themselves are thread-safe.
    private let lock = Mutex(())
    private var sources: [DispatchSourceSignal] = []
    func keep(_ source: DispatchSourceSignal) { lock.withLock { _ in sources.append(source) } }
}

private let keptSignalSources = SignalSourceList()

/// Ends `waitForTermination` as SIGTERM would (a daemon's own "exit" command).
public func requestTermination() {
    kill(getpid(), SIGTERM)
}
