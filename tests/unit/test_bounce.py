"""Bounce classification and DSN construction."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

import pytest
from flufl.bounce import all_failures

from epoxi.bounce.classify import (
    BounceCategory,
    Classification,
    Classifier,
    _alternation,
    fallback,
    normalize_text,
)
from epoxi.bounce.dsn import RecipientFailure, build_dsn, should_send_dsn
from epoxi.errors import ConfigError
from epoxi.message import MessageMeta
from epoxi.smtp.replies import Reply

C = BounceCategory

# (code, enhanced, text, category, permanent): replies as real servers word them.
REPLIES: list[tuple[int, str, str, BounceCategory, bool]] = [
    # Gmail
    (550, "5.1.1", "The email account that you tried to reach does not exist. Please try\ndouble-checking the recipient's email address for typos or\nunnecessary spaces. For more information, go to\nhttps://support.google.com/mail/?p=NoSuchUser d9443c01a7336-1e0bb0b1bd3si1234567pla.123 - gsmtp", C.InvalidRecipient, True),
    (550, "5.2.1", "The email account that you tried to reach is disabled. Learn more at https://support.google.com/mail/?p=DisabledUser a640c23a62f3a-a2f2f0f1a0esi1234567ab.12 - gsmtp", C.InvalidRecipient, True),
    (452, "4.2.2", "The email account that you tried to reach is over quota. Please direct the recipient to https://support.google.com/mail/?p=OverQuotaTemp", C.MailboxFull, False),
    (552, "5.2.2", "The email account that you tried to reach is over quota and inactive.", C.MailboxFull, True),
    (552, "5.3.4", "Your message exceeded Google's message size limits. Please visit https://support.google.com/mail/?p=MaxSizeError to view our size guidelines.", C.MessageTooLarge, True),
    (421, "4.7.0", "[192.0.2.1 15] Our system has detected an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been temporarily rate limited.", C.RateLimited, False),
    (550, "5.7.1", "[192.0.2.1] Our system has detected that this message is likely unsolicited mail. To reduce the amount of spam sent to Gmail, this message has been blocked.", C.SpamBlock, True),
    (550, "5.7.26", "This mail has been blocked because the sender is unauthenticated. Gmail requires all senders to authenticate with either SPF or DKIM.", C.PolicyRejection, True),
    (550, "5.7.26", "Unauthenticated email from example.com is not accepted due to domain's DMARC policy.", C.PolicyRejection, True),
    (550, "5.7.25", "The IP address sending this message does not have a PTR record setup, or the corresponding forward DNS entry does not point to the sending IP.", C.PolicyRejection, True),
    (421, "4.7.0", "TLS required for RCPT domain, closing connection.", C.TLSRequired, False),
    (552, "5.7.0", "This message was blocked because its content presents a potential security issue.", C.ContentRejected, True),
    (550, "5.4.5", "Daily user sending quota exceeded.", C.RateLimited, False),
    (452, "4.5.3", "Your message has too many recipients.", C.RateLimited, False),
    (421, "4.3.0", "Temporary System Problem. Try again later.", C.MailSystemError, False),
    # Microsoft
    (550, "5.5.0", "Requested action not taken: mailbox unavailable (S2017062302). [BN8NAM12FT067.eop-nam12.prod.protection.outlook.com 2024-03-01T10:00:00.000Z 08DC3A1B2C3D4E5F]", C.InvalidRecipient, True),
    (550, "5.4.1", "Recipient address rejected: Access denied. AS(201806281) [DM6NAM12FT034.eop-nam12.prod.protection.outlook.com]", C.InvalidRecipient, True),
    (550, "5.1.10", "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup", C.InvalidRecipient, True),
    (550, "5.7.1", "Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3150).", C.SpamBlock, True),
    (550, "5.7.606", "Access denied, banned sending IP [192.0.2.1]. To request removal from this list please visit https://sender.office.com/ and follow the directions.", C.SpamBlock, True),
    (550, "5.7.509", "Access denied, sending domain example.com does not pass DMARC verification and has a DMARC policy of reject.", C.PolicyRejection, True),
    (451, "4.7.500", "Server busy. Please try again later from [192.0.2.1]. (S77714)", C.RateLimited, False),
    (554, "5.2.2", "mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException.MapiExceptionShutoffQuotaExceeded", C.MailboxFull, False),
    (550, "5.7.64", "TenantAttribution; Relay Access Denied", C.RelayDenied, True),
    (530, "5.7.57", "Client not authenticated to send mail.", C.AuthRequired, True),
    (554, "5.4.14", "Hop count exceeded - possible mail loop ATTR34", C.RoutingError, True),
    (550, "5.1.8", "Access denied, bad outbound sender.", C.BadSender, True),
    # Yahoo / AOL
    (421, "4.7.0", "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes", C.RateLimited, False),
    (553, "5.7.2", "[TSS09] All messages from 192.0.2.1 will be permanently deferred; Retrying will NOT succeed. See https://postmaster.yahooinc.com/error-codes", C.SpamBlock, True),
    (421, "4.7.1", "[TS03] All messages from 192.0.2.1 will be permanently deferred; Retrying will NOT succeed.", C.SpamBlock, True),
    (554, "5.7.9", "Message not accepted for policy reasons. See https://postmaster.yahooinc.com/error-codes", C.PolicyRejection, True),
    (554, "", "delivery error: dd This user doesn't have a yahoo.com account (someone@yahoo.com) [0] - mta1234.mail.ne1.yahoo.com", C.InvalidRecipient, True),
    (554, "", "30 Sorry, your message size exceeds 41943040 bytes.", C.MessageTooLarge, True),
    # iCloud, Proofpoint, Mimecast
    (550, "5.7.0", "Blocked - see https://support.apple.com/en-us/HT204137", C.SpamBlock, True),
    (554, "5.7.1", "Blocked - see https://ipcheck.proofpoint.com/?ip=192.0.2.1", C.SpamBlock, True),
    (550, "", "Administrative prohibition", C.PolicyRejection, True),
    (550, "", "Invalid Recipient - https://community.mimecast.com/docs/DOC-1369#550", C.InvalidRecipient, True),
    # Postfix, Exim, sendmail and friends
    (550, "5.1.1", "<jane.doe@example.com>: Recipient address rejected: User unknown in virtual mailbox table", C.InvalidRecipient, True),
    (450, "4.1.1", "<jane.doe@example.com>: Recipient address rejected: User unknown in local recipient table", C.InvalidRecipient, False),
    (550, "", "No Such User Here", C.InvalidRecipient, True),
    (511, "", "sorry, no mailbox here by that name", C.InvalidRecipient, True),
    (554, "5.7.1", "<jane@example.com>: Relay access denied", C.RelayDenied, True),
    (554, "5.7.1", "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org; https://www.spamhaus.org/query/ip/192.0.2.1", C.SpamBlock, True),
    (450, "4.2.0", "<jane@example.com>: Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/help/example.com.html", C.RateLimited, False),
    (451, "4.7.1", "Please try again in 300 seconds", C.RateLimited, False),
    (450, "4.1.2", "<jane@nowhere.invalid>: Recipient address rejected: Domain not found", C.BadDomain, False),
    (550, "5.1.2", "Host or domain name not found. Name service error for name=nowhere.test type=A: Host not found", C.BadDomain, True),
    (556, "5.1.10", "Recipient address has null MX", C.BadDomain, True),
    (450, "4.7.1", "Client host rejected: cannot find your hostname, [192.0.2.1]", C.PolicyRejection, False),
    (452, "4.3.1", "Insufficient system storage", C.MailSystemError, False),
    (552, "5.3.4", "Message size exceeds fixed limit", C.MessageTooLarge, True),
    (552, "5.5.3", "Too many recipients", C.RateLimited, False),
    (421, "4.7.0", "mx.example.com Error: too many connections from 192.0.2.1", C.RateLimited, False),
    (550, "", "Unrouteable address", C.RoutingError, True),
    (451, "", "Temporary local problem - please try later", C.MailSystemError, False),
    (550, "", "Verification failed for <s@example.com>\nUnrouteable address\nSender verify failed", C.BadSender, True),
    (554, "5.6.0", "Message contains a virus (Eicar-Test-Signature)", C.ContentRejected, True),
    (550, "5.7.1", "Message rejected as spam by Content Filtering.", C.SpamBlock, True),
    (530, "5.7.0", "Must issue a STARTTLS command first", C.TLSRequired, True),
    (530, "5.7.0", "Authentication required", C.AuthRequired, True),
    (535, "5.7.8", "Authentication credentials invalid", C.AuthRequired, True),
    (550, "5.4.300", "Message expired", C.Expired, True),
    # Epoxi's own synthetic replies for failures without one
    (451, "4.4.1", "connection refused", C.TransientNetwork, False),
    (451, "4.4.2", "connection lost: timeout waiting for the data-end reply", C.TransientNetwork, False),
    (451, "4.4.3", "DNS lookup for example.com failed: SERVFAIL", C.RoutingError, False),
    # Nothing to go on but the codes
    (451, "4.3.0", "Mail server temporarily rejected message.", C.MailSystemError, False),
    (550, "", "something nobody has seen", C.Other, True),
    (450, "", "something nobody has seen", C.Other, False),
]  # fmt: skip


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return Classifier.default()


# (rule, code, enhanced, text, category, permanent): the rules and wordings of issue 14 item 6,
# each with a reply as a class of servers words it (more in tests/data/bounce-corpus).
RULE_REPLIES: list[tuple[str, int, str, str, BounceCategory, bool]] = [
    # expiry at another MTA
    ("expired", 550, "", "retry time not reached for any host for 'example.com' after a long failure period", C.Expired, True),  # Exim
    ("expired", 550, "", "all hosts for 'example.com' have been failing for a long time (and retry time not reached)", C.Expired, True),  # Exim
    ("expired", 550, "", "I'm not going to try again; this message has been in the queue too long.", C.Expired, True),  # qmail
    ("expired", 550, "", "Giving up after 12 attempts: Connection timed out", C.Expired, True),
    ("expired", 550, "", "Envelope expired", C.Expired, True),  # Courier
    ("expired", 550, "5.4.7", "Connection timed out: max age reached, giving up", C.Expired, True),
    ("expired", 450, "4.4.7", "Message could not be delivered for 5 days", C.Expired, False),  # Sendmail
    ("expired", 550, "", "Delivery failed 20 attempts: someone@example.ph", C.Expired, True),  # SMTP32
    ("gave-up-on-network", 550, "", "Server did not respond", C.Expired, True),
    ("gave-up-on-network", 550, "", "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)", C.Expired, True),
    ("gave-up-on-network", 550, "", "Name service error for domain example.com: Host not found, try again", C.Expired, True),  # Postfix
    ("network", 450, "", "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)", C.TransientNetwork, False),
    ("network", 450, "", "Remote host mx.example.com [192.0.2.1] closed connection in response to end of data", C.TransientNetwork, False),  # Exim
    ("dns-temporary", 450, "4.4.3", "Host or domain name not found. Name service error for name=example.com type=MX: Host not found, try again", C.RoutingError, False),  # Postfix
    # mailing lists, groups and recipients that take mail from chosen senders only
    ("restricted-recipient", 550, "", "Post by non-member to a members-only list", C.PolicyRejection, True),  # Mailman
    ("restricted-recipient", 550, "", "You do not have permission to post to this group", C.PolicyRejection, True),  # Google Groups
    ("restricted-recipient", 550, "", "Sorry, only subscribers may post. If you are a subscriber, please forward this message to the list owner", C.PolicyRejection, True),  # ezmlm
    ("restricted-recipient", 550, "5.7.133", "RESOLVER.RST.SenderNotAuthenticatedForGroup; authentication required; Delivery restriction check failed as sender not authenticated for group", C.PolicyRejection, True),  # Microsoft 365
    ("restricted-recipient", 550, "5.7.1", "You have been blocked by the recipient", C.PolicyRejection, True),
    ("restricted-recipient", 550, "", "Refused due to recipient preferences", C.PolicyRejection, True),  # Facebook
    ("restricted-recipient", 550, "", "Sie sind kein Mitglied dieser Gruppe", C.PolicyRejection, True),
    ("restricted-recipient", 550, "", "Vous n'êtes pas membre de ce groupe", C.PolicyRejection, True),
    ("restricted-recipient", 550, "", "No eres miembro de este grupo", C.PolicyRejection, True),
    ("restricted-recipient", 550, "", "Você não é membro deste grupo", C.PolicyRejection, True),
    ("restricted-recipient", 550, "", "Non sei membro di questo gruppo", C.PolicyRejection, True),
    ("restricted-recipient", 550, "", "Вы не являетесь участником этой группы", C.PolicyRejection, True),
    ("restricted-recipient", 550, "", "このグループのメンバーではありません", C.PolicyRejection, True),
    # SMTP authentication, before the SPF/DKIM wording it resembles
    ("smtp-authentication", 530, "5.7.57", "Client not authenticated to send mail. Error: 535 5.7.139 Authentication unsuccessful, the request did not meet the criteria to be authenticated successfully.", C.AuthRequired, True),  # Microsoft 365
    ("smtp-authentication", 550, "", "Please turn on SMTP Authentication in your mail client.", C.AuthRequired, True),  # cPanel Exim
    ("smtp-authentication", 553, "", "sorry, you don't authenticate or the domain isn't in my list of allowed rcpthosts(#5.7.1)", C.AuthRequired, True),  # qmail
    ("smtp-authentication", 550, "", "Unauthenticated senders not allowed", C.AuthRequired, True),
    ("smtp-authentication", 553, "5.7.1", "<s@example.com>: Sender address rejected: not logged in", C.AuthRequired, True),  # Postfix
    ("authentication-required", 550, "", "Authentication failure", C.AuthRequired, True),
    ("authentication-required", 454, "4.7.0", "Temporary authentication failure", C.AuthRequired, False),
    # content, before the spam wording in the same reply
    ("content-malware", 550, "5.7.1", "Our system has detected that this message is not RFC 5322 compliant: Multiple 'Subject' headers. To reduce the amount of spam sent to Gmail, this message has been blocked.", C.ContentRejected, True),
    ("content-malware", 552, "5.7.0", "Our system detected an illegal attachment on your message.", C.ContentRejected, True),  # Gmail
    ("content-malware", 554, "5.7.0", "Reject, id=12345-02 - BANNED: P=p003,L=1,M=multipart/mixed", C.ContentRejected, True),  # Amavis
    # a locked mailbox, before "is blocked" reads as a blocklist
    ("recipient-locked", 550, "5.7.1", "User account is blocked", C.InvalidRecipient, True),  # Yandex
    ("recipient-locked", 550, "5.2.1", "This mailbox has been blocked due to inactivity", C.InvalidRecipient, True),
    # wider wordings in existing rules
    ("invalid-recipient", 550, "", "User someone (someone@example.com) not listed in Domino Directory", C.InvalidRecipient, True),
    ("invalid-recipient", 550, "", "User someone (someone@example.co.jp) not listed in public Name & Address Book", C.InvalidRecipient, True),
    ("invalid-recipient", 550, "", "Not our Customer", C.InvalidRecipient, True),  # Comcast
    ("invalid-recipient", 550, "", "#5.1.0 Address rejected someone@seznam.cz", C.InvalidRecipient, True),
    ("invalid-recipient", 550, "", "The recipient name is not recognized", C.InvalidRecipient, True),  # Exchange 5.5
    ("invalid-recipient", 550, "", "Empfänger unbekannt: someone@example.de", C.InvalidRecipient, True),
    ("invalid-recipient", 550, "", "Le destinataire n'existe pas", C.InvalidRecipient, True),
    ("invalid-recipient", 550, "", "No existe dicha persona en este servidor", C.InvalidRecipient, True),
    ("invalid-recipient", 550, "", "Nessun utente simile in questo indirizzo", C.InvalidRecipient, True),
    ("invalid-recipient", 550, "", "Utilizador desconhecido", C.InvalidRecipient, True),
    ("invalid-recipient", 550, "", "Пользователь не найден", C.InvalidRecipient, True),
    ("invalid-recipient", 550, "", "宛先のユーザーが存在しません", C.InvalidRecipient, True),
    ("bad-domain", 550, "5.4.310", "DNS domain nowhere.test does not exist [Message=InfoDomainNonexistent]", C.BadDomain, True),  # Microsoft 365
    ("bad-domain", 550, "", "Sorry, I couldn't find any host named nowhere.test. (#5.1.2)", C.BadDomain, True),  # qmail
    ("mailbox-full", 550, "", "The e-mail message could not be delivered because the user's mailfolder is full.", C.MailboxFull, False),  # qmail
    ("mailbox-full", 552, "", "Quota violation for someone@example.com", C.MailboxFull, False),
    ("mailbox-full", 550, "5.2.2", "cannot update mailbox /var/mail/someone for user someone. error writing message: File too large", C.MailboxFull, False),  # Postfix local(8)
    ("mailbox-full", 552, "", "Почтовый ящик переполнен", C.MailboxFull, False),
    ("message-too-large", 552, "", "Message trop volumineux", C.MessageTooLarge, True),
    ("rate-limited", 450, "4.7.1", "Error: too much mail from 192.0.2.1", C.RateLimited, False),  # Postfix anvil
    ("rate-limited", 450, "4.2.1", "The user you are trying to contact is receiving mail too quickly.", C.RateLimited, False),  # Gmail
    ("spam-blocklist", 550, "5.7.1", "Message score too high: 12.3 > 5.0", C.SpamBlock, True),  # Rspamd
    ("relay-denied", 550, "", "sorry, that domain isn't in my list of allowed rcpthosts (#5.5.3 - chkuser)", C.RelayDenied, True),  # qmail
    ("sender-rejected", 550, "", "Empty envelope senders not allowed", C.BadSender, True),
    ("routing", 554, "5.4.0", "This message is looping: it already has my Delivered-To line. (#5.4.6)", C.RoutingError, True),  # qmail
    ("mail-system", 550, "", "Command died with status 255: \"/usr/local/bin/deliver\"", C.MailSystemError, True),  # Postfix pipe(8)
    ("mail-system", 550, "", "Several matches found in Domino Directory", C.MailSystemError, True),
    # kinds of wording the first held-out set missed
    ("restricted-recipient", 550, "", "You must be subscribed to this list to post", C.PolicyRejection, True),
    ("restricted-recipient", 550, "", "Posting restricted to list members", C.PolicyRejection, True),
    ("recipient-locked", 550, "5.1.1", "The mail server could not deliver mail to someone@example.com.  The account or domain may not exist, they may be blacklisted, or missing the proper dns entries.", C.InvalidRecipient, True),  # GoDaddy
    ("invalid-recipient", 550, "5.1.1", "Recipient rejected: The address someone@example.com is unknown", C.InvalidRecipient, True),
    ("invalid-recipient", 550, "", "This account has been temporarily suspended. Please try again later.", C.InvalidRecipient, True),
    ("mailbox-full", 552, "", "Mailbox exceeds allowed size", C.MailboxFull, False),
    ("message-too-large", 552, "", "Sorry, that message is larger than allowed", C.MessageTooLarge, True),
    ("dns-temporary", 451, "4.4.3", "Temporary failure in name resolution", C.RoutingError, False),
    ("expired", 550, "", "Delivery failed: message has been in queue for 5 days", C.Expired, True),
    ("sender-rejected", 550, "5.7.1", "Sender address is not allowed", C.BadSender, True),
    # qmail names the host it gave up on after a permanent refusal too: the refusal decides
    ("invalid-recipient", 550, "", "64.136.25.171 does not like recipient. Remote host said: 550 <x@example.com>: Recipient address rejected: User unknown in virtual alias table Giving up on 64.136.25.171.", C.InvalidRecipient, True),
]  # fmt: skip


@pytest.mark.parametrize(
    ("rule", "code", "enhanced", "text", "category", "permanent"), RULE_REPLIES
)
def test_rule_classifies_what_its_servers_say(
    classifier: Classifier,
    rule: str,
    code: int,
    enhanced: str,
    text: str,
    category: BounceCategory,
    permanent: bool,
) -> None:
    result = classifier.classify(Reply(code, enhanced, text))
    assert result == Classification(category, permanent, rule)


@pytest.mark.parametrize(("code", "enhanced", "text", "category", "permanent"), REPLIES)
def test_classification_of_real_replies(
    classifier: Classifier,
    code: int,
    enhanced: str,
    text: str,
    category: BounceCategory,
    permanent: bool,
) -> None:
    result = classifier.classify(Reply(code, enhanced, text))
    assert (result.category, result.permanent) == (category, permanent), result.rule


@pytest.mark.parametrize(
    ("code", "enhanced", "category", "rule"),
    [
        (550, "5.1.1", C.InvalidRecipient, "rfc3463:X.1.1"),
        (553, "5.1.10", C.BadDomain, "rfc3463:X.1.10"),
        (550, "5.1.7", C.BadSender, "rfc3463:X.1.7"),
        (452, "4.2.2", C.MailboxFull, "rfc3463:X.2.2"),
        (552, "5.3.4", C.MessageTooLarge, "rfc3463:X.3.4"),
        (451, "4.3.5", C.MailSystemError, "rfc3463:X.3"),
        (451, "4.4.7", C.Expired, "rfc3463:X.4.7"),
        (421, "4.4.2", C.TransientNetwork, "rfc3463:X.4"),
        (501, "5.5.2", C.ProtocolError, "rfc3463:X.5"),
        (554, "5.6.1", C.ContentRejected, "rfc3463:X.6"),
        (550, "5.7.11", C.TLSRequired, "rfc3463:X.7.11"),
        (550, "5.7.23", C.PolicyRejection, "rfc3463:X.7"),
        (530, "", C.AuthRequired, "code:530"),
        (556, "", C.BadDomain, "code:556"),
        (550, "", C.Other, "code:5xx"),
        (554, "9.9.9", C.Other, "code:5xx"),
    ],
)
def test_fallback_on_enhanced_then_reply_code(
    classifier: Classifier, code: int, enhanced: str, category: BounceCategory, rule: str
) -> None:
    expected = Classification(category, code >= 500, rule)
    assert fallback(code, enhanced) == expected
    assert classifier.classify(Reply(code, enhanced, "zzz")) == expected


def test_text_wins_over_a_misused_enhanced_code(classifier: Classifier) -> None:
    # 5.1.1 says "no such mailbox", but the words say the sender is blocklisted.
    result = classifier.classify(Reply(550, "5.1.1", "Client host blocked using bl.example.org"))
    assert result.category is C.SpamBlock


# ------------------------------------------------------------------------ normalisation, cache


def test_normalisation_masks_ids_and_addresses_but_keeps_short_codes() -> None:
    text = (
        "<jane.doe@example.com>: Rejected [192.0.2.7]\n(S3150) [TSS04] 5.7.1 in 300 seconds "
        "id=4Xb2kL1z0Qz9 at 2024-03-01T10:00:00.000Z by mta1234.mail.example.net for "
        "(someone@yahoo.com) AS(201806281) d9443c01a7336-1e0bb0b1bd3si1234567pla.123"
    )
    assert normalize_text(text) == (
        "<@>: rejected [#] (s3150) [tss04] 5.7.1 in 300 seconds id=# at # by mta# for (@) as(#) d#"
    )


def test_cache_returns_the_same_object(classifier: Classifier) -> None:
    first = classifier.classify(Reply(550, "5.1.1", "User unknown"))
    assert classifier.classify(Reply(550, "5.1.1", "User unknown")) is first


def test_replies_differing_in_ids_share_one_cache_entry() -> None:
    classifier = Classifier.default()
    gmail = "The email account that you tried to reach does not exist. {} - gsmtp"
    first = classifier.classify(Reply(550, "5.1.1", gmail.format("d9443c01a7336-1e0bb0b1bd3si1")))
    again = classifier.classify(Reply(550, "5.1.1", gmail.format("d2e1c3b4d5f67-9a8b7c6d5e4sm2")))
    assert again is first


def test_cache_is_bounded() -> None:
    classifier = Classifier(Classifier.default().rules, cache_size=8)
    results = {classifier.classify(Reply(550, "", f"unknown user number {n}")) for n in range(50)}
    assert {r.category for r in results} == {C.InvalidRecipient}


@pytest.mark.parametrize(
    "items",
    [
        ["user unknown", "unknown user", "user not found", "u", "no such user"],
        ["a|b", "ab?c", "x?y", "(?:q)r", "[ab]c", r"\d+ days", "", "spf\\b"],
        ["mailbox (?:is )?full", "mailbox size limit", "mail ?folder", "mail box"],
    ],
)
def test_grouped_alternation_matches_what_the_plain_one_does(items: list[str]) -> None:
    grouped, plain = re.compile(_alternation(items)), re.compile("|".join(items))
    samples = [
        "user unknown", "unknown user", "xx user not found", "u", "no such user", "a", "b",
        "ac", "abc", "y", "xy", "qr", "bc", "12 days", "spf", "spfx", "mailbox is full",
        "mailbox size limit", "mailfolder", "mail folder", "mail box", "nothing", "",
    ]  # fmt: skip
    for text in samples:
        assert (grouped.search(text) is None) == (plain.search(text) is None), text


# --------------------------------------------------------------------------------- user rules


def write_rules(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_user_rules_come_before_shipped_rules(tmp_path: Path) -> None:
    mine = write_rules(
        tmp_path,
        "mine.toml",
        '[[rule]]\nid = "acme-unknown-is-temporary"\ncategory = "InvalidRecipient"\n'
        'code = "55x"\nenhanced = "X.1.*"\ntext = "user unknown"\npermanent = false\n',
    )
    result = Classifier.from_files([mine]).classify(Reply(550, "5.1.1", "User unknown"))
    assert result == Classification(C.InvalidRecipient, False, "acme-unknown-is-temporary")
    other = Classifier.from_files([mine]).classify(Reply(450, "4.1.1", "no such user"))
    assert other == Classification(C.InvalidRecipient, False, "invalid-recipient")


def test_user_files_are_read_in_order_and_may_make_4xx_permanent(tmp_path: Path) -> None:
    first = write_rules(
        tmp_path,
        "a.toml",
        '[[rule]]\nid = "a"\ncategory = "InvalidRecipient"\ncode = [450, "451"]\n'
        'text = "no such user"\npermanent = true\n',
    )
    second = write_rules(
        tmp_path, "b.toml", '[[rule]]\nid = "b"\ncategory = "Other"\ntext = "no such user"\n'
    )
    classifier = Classifier.from_files([first, second])
    assert classifier.classify(Reply(450, "", "No such user")) == Classification(
        C.InvalidRecipient, True, "a"
    )
    assert classifier.classify(Reply(550, "", "No such user")).rule == "b"


def test_enhanced_patterns_match_as_documented(tmp_path: Path) -> None:
    rules = write_rules(
        tmp_path,
        "e.toml",
        '[[rule]]\nid = "any-security"\ncategory = "SpamBlock"\nenhanced = "X.7.*"\n'
        '[[rule]]\nid = "no-enhanced"\ncategory = "ContentRejected"\nenhanced = ""\n'
        "code = 554\n",
    )
    classifier = Classifier.from_files([rules])
    assert classifier.classify(Reply(450, "4.7.123", "x")).rule == "any-security"
    assert classifier.classify(Reply(554, "5.7.1", "x")).rule == "any-security"
    assert classifier.classify(Reply(554, "5.1.7", "x")).rule != "any-security"
    assert classifier.classify(Reply(554, "", "x")).rule == "no-enhanced"
    assert classifier.classify(Reply(550, "", "x")).rule == "code:5xx"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[rule]]\nid = "x"\ncategory = "Nope"\ntext = "a"\n', "#1: category = 'Nope'"),
        ('[[rule]]\nid = "x"\ncategory = "Other"\ntext = "(("\n', "text = '((' is not a valid regex"),
        ('[[rule]]\nid = "x"\ncategory = "Other"\ncode = "abc"\n', "#1: code = 'abc'"),
        ('[[rule]]\nid = "x"\ncategory = "Other"\ncode = 650\n', "code = 650"),
        ('[[rule]]\nid = "x"\ncategory = "Other"\nenhanced = "5.7"\n', "enhanced = '5.7'"),
        ('[[rule]]\nid = "x"\ncategory = "Other"\ntext = "a"\ncolour = 1\n', "unknown key 'colour' (value 1)"),
        ('[[rule]]\ncategory = "Other"\ntext = "a"\n', "#1: id = None"),
        ('[[rule]]\nid = "x"\ncategory = "Other"\n', "#1: matches everything"),
        ('[[rule]]\nid = "x"\ncategory = "Other"\ntext = "a"\npermanent = "yes"\n', "permanent = 'yes'"),
        ('[[rule]]\nid = "x"\ncategory = "Other"\ntext = "a"\n[[rule]]\nid = "x"\ncategory = "Other"\ntext = "b"\n', "#2: id = 'x' is used twice"),
        ('[[rule]]\nid = "ok"\ncategory = "Other"\ntext = "a"\n[[rule]]\nid = "y"\ncategory = "Other"\ntext = "[z"\n', "#2: text = '[z'"),
        ("rules = 1\n", "unknown top-level key 'rules'"),
        ("[[rule]\n", "not valid TOML"),
    ],
)  # fmt: skip
def test_malformed_rules_are_config_errors(tmp_path: Path, text: str, message: str) -> None:
    bad = write_rules(tmp_path, "bad.toml", text)
    with pytest.raises(ConfigError) as info:
        Classifier.from_files([bad])
    assert str(bad) in str(info.value)
    assert message in str(info.value)


def test_missing_rules_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        Classifier.from_files([tmp_path / "missing.toml"])


# ------------------------------------------------------------------------------------- DSNs

ORIGINAL_HEADERS = (
    b"From: Anna <a@x.test>\r\nTo: b@y.test\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"Message-ID: <1@x.test>\r\n"
)
UTF8_HEADERS = "From: a@x.test\r\nTo: b@y.test\r\nSubject: Grüße aus Köln ✓\r\n".encode()


def original(sender: str = "a@x.test") -> MessageMeta:
    return MessageMeta(
        id="ORIG",
        sender=sender,
        recipients=["b@y.test", "c@y.test"],
        received_at=1_700_000_000,
        size=100,
    )


def dsn(
    failures: list[RecipientFailure],
    headers: bytes = ORIGINAL_HEADERS,
    **kwargs: Any,
) -> tuple[bytes, EmailMessage]:
    raw = build_dsn(
        reporting_mta="mx.test",
        original=kwargs.pop("meta", original()),
        original_headers=headers,
        failures=failures,
        dsn_id="DSN1",
        now=1_700_000_500,
        **kwargs,
    )
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return raw, parsed


def parts(message: EmailMessage) -> list[Any]:
    payload = message.get_payload()
    assert isinstance(payload, list)
    return payload


FAILURES = [
    RecipientFailure("b@y.test", Reply(550, "5.1.1", "User unknown"), "mx.y.test"),
    RecipientFailure("c@y.test", Reply(552, "", "Mailbox full"), "mx.y.test"),
]


def test_dsn_is_a_delivery_status_report() -> None:
    raw, message = dsn(FAILURES)
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@mx.test>"
    assert message["To"] == "a@x.test"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["Message-ID"] == "<DSN1@mx.test>"
    text, status, headers = parts(message)
    assert text.get_content_type() == "text/plain"
    assert "<b@y.test>" in text.get_content()
    assert "mx.y.test said: 550 5.1.1 User unknown" in text.get_content()
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert headers.get_payload(decode=True) == ORIGINAL_HEADERS


def test_delivery_status_fields() -> None:
    _raw, message = dsn(FAILURES)
    per_message, first, second = parts(message)[1].get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.test"
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 -0000"
    assert [b["Final-Recipient"] for b in (first, second)] == [
        "rfc822; b@y.test",
        "rfc822; c@y.test",
    ]
    assert [b["Action"] for b in (first, second)] == ["failed", "failed"]
    assert [b["Status"] for b in (first, second)] == ["5.1.1", "5.0.0"]
    assert first["Remote-MTA"] == "dns; mx.y.test"
    assert first["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown"
    assert second["Diagnostic-Code"] == "smtp; 552 Mailbox full"
    assert first["Last-Attempt-Date"] == "Tue, 14 Nov 2023 22:21:40 -0000"


def test_flufl_bounce_sees_the_failed_recipients_as_permanent() -> None:
    raw, _message = dsn(FAILURES)
    temporary, permanent = all_failures(email.message_from_bytes(raw))
    assert permanent == {b"b@y.test", b"c@y.test"}
    assert not temporary


def test_delayed_dsn_is_temporary_for_flufl_bounce() -> None:
    delayed = [RecipientFailure("b@y.test", Reply(451, "4.4.1", "connection refused"))]
    raw, message = dsn(delayed, kind="delayed")
    assert message["Subject"] == "Delayed Mail (still being retried)"
    block = parts(message)[1].get_payload()[1]
    assert (block["Action"], block["Status"]) == ("delayed", "4.4.1")
    temporary, permanent = all_failures(email.message_from_bytes(raw))
    assert temporary == {b"b@y.test"}
    assert not permanent


def test_expiry_without_a_reply_reports_4_4_7_and_the_reason() -> None:
    expired = [RecipientFailure("b@y.test", None, reason="no delivery in 5 days")]
    _raw, message = dsn(expired)
    block = parts(message)[1].get_payload()[1]
    assert (block["Action"], block["Status"]) == ("failed", "4.4.7")
    assert block["Diagnostic-Code"] == "X-Epoxi; no delivery in 5 days"
    assert "Remote-MTA" not in block
    assert "no delivery in 5 days" in parts(message)[0].get_content()


def test_explicit_status_and_mixed_actions() -> None:
    mixed = [
        RecipientFailure("b@y.test", None, reason="bounced by the operator", status="5.0.0"),
        RecipientFailure("c@y.test", Reply(450, "4.2.0", "try later"), action="delayed"),
    ]
    _raw, message = dsn(mixed)
    blocks = parts(message)[1].get_payload()[1:]
    assert [(b["Action"], b["Status"]) for b in blocks] == [
        ("failed", "5.0.0"),
        ("delayed", "4.2.0"),
    ]


def test_long_diagnostics_are_folded_without_encoded_words() -> None:
    text = (
        "The email account that you tried to reach does not exist. Please try\n"
        "double-checking the recipient's email address for typos or\nunnecessary spaces. "
        "https://support.google.com/mail/?p=NoSuchUser&with=a-very-long-query-string-that-"
        "cannot-be-folded-anywhere-at-all d9443c01a7336-1e0bb0b1bd3si1234567pla.123 - gsmtp"
    )
    reply = Reply(550, "5.1.1", text)
    raw, message = dsn([RecipientFailure("b@y.test", reply)], headers=b"From: a@x.test\r\n")
    assert b"=?" not in raw
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    block = parts(message)[1].get_payload()[1]
    assert block["Diagnostic-Code"] == "smtp; " + " ".join(str(reply).split())


def test_non_ascii_original_subject_survives() -> None:
    raw, message = dsn(FAILURES, headers=UTF8_HEADERS)
    assert raw.isascii()
    headers = parts(message)[2]
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Subject: Grüße aus Köln ✓" in headers.get_content()
    decoded = headers.get_payload(decode=True)
    assert decoded.replace(b"\r\n", b"\n") == UTF8_HEADERS.replace(b"\r\n", b"\n")


def test_non_ascii_recipient_and_reply_text_stay_readable() -> None:
    failures = [RecipientFailure("jörg@y.test", Reply(550, "5.1.1", "Benutzer unbekannt: jörg"))]
    raw, message = dsn(failures)
    assert raw.isascii()
    text, status, _headers = parts(message)
    assert "<jörg@y.test>" in text.get_content()
    block = status.get_payload()[1]
    assert block["Final-Recipient"] == "utf-8; j\\x{F6}rg@y.test"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 Benutzer unbekannt: j?rg"


def test_internationalised_sender_gets_a_utf8_dsn() -> None:
    raw, message = dsn(FAILURES, meta=original("änna@x.test"))
    assert message["To"] == "änna@x.test"
    assert "änna@x.test".encode() in raw


def test_dsn_needs_a_recipient() -> None:
    with pytest.raises(ValueError, match="at least one"):
        dsn([])


# ------------------------------------------------------------------------------ loop guard


def test_dsn_for_an_ordinary_message() -> None:
    assert should_send_dsn(original(), ORIGINAL_HEADERS)
    assert should_send_dsn(original(), b"Auto-Submitted: no\r\n" + ORIGINAL_HEADERS)
    assert should_send_dsn(original("postmistress@x.test"), ORIGINAL_HEADERS)


@pytest.mark.parametrize(
    "sender",
    ["", "MAILER-DAEMON@x.test", "mailer-daemon", "postmaster@x.test", "double-bounce@x.test"],
)
def test_no_dsn_to_the_null_sender_or_a_mail_system(sender: str) -> None:
    assert not should_send_dsn(original(sender), ORIGINAL_HEADERS)


@pytest.mark.parametrize(
    "extra",
    [
        b"Content-Type: multipart/report; report-type=delivery-status;\r\n boundary=x\r\n",
        b"Content-Type:\r\n Multipart/Report; report-type=disposition-notification\r\n",
        b"Auto-Submitted: auto-replied\r\n",
        b"Auto-Submitted: Auto-Generated (vacation)\r\n",
        b"X-Failed-Recipients: b@y.test\r\n",
    ],
)
def test_no_dsn_for_reports_or_automatic_messages(extra: bytes) -> None:
    assert not should_send_dsn(original(), ORIGINAL_HEADERS + extra)


def test_no_dsn_for_our_own_dsn() -> None:
    raw, _message = dsn(FAILURES)
    headers = raw.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    assert not should_send_dsn(original(), headers)
    assert isinstance(email.message_from_bytes(raw), Message)
